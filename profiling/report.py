"""Reports from result files: a markdown table per op and PNG plots, for one run or two compared.

``write_report([a.json], out_dir)`` or ``write_report([a.json, b.json], out_dir)`` writes
``report.md``, ``throughput-<op>.png`` (one figure per op: a panel per series and bound, x the
tokens or the problems, one colour per implementation, the runs overlaid as solid and dashed
lines, each run's ceiling dotted), ``roofline.png`` (TFLOP/s against arithmetic intensity under
each run's measured roofs; one colour per op, one marker per kind of implementation) and
``bandwidth.png`` (GB/s of the memory-bound rows against the measured copy bandwidth).

Every row is given in the unit that bounds it (the roofline: TF/s where the FLOPs at the matmul
ceiling take longer than the bytes at the copy bandwidth, else GB/s). Speedups are computed within
each run (over that run's baseline). Runs are labelled by their folder (or file), git ref and date.
Rows above a ceiling are flagged with the likely reason, failed checks are printed in full, and an
out-of-memory check or row is reported as not checked / skipped, never as wrong output.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .results import load_results

__all__ = [
    "write_report", "markdown", "run_names", "run_label", "check_text", "check_state", "ceiling_flag", "bound_unit",
]

_KIND_MARKER = {"moela": "o", "reference": "x", "torch": "^", "outside": "s"}
_RUN_STYLE = ("-", "--")
_OOM = "OutOfMemoryError"


# ---------------------------------------------------------------------- row facts
def check_text(chk: dict[str, Any]) -> str:
    """A check in words: ``calc_diff 0.5 > tol 1e-05``, or its full detail where nothing was measured."""
    detail = chk.get("detail") or ""
    if chk.get("metric") is None or chk.get("value") is None:
        return detail or "no measurement"
    op = "<=" if chk.get("ok") else ">"
    text = f"{chk['metric']} {chk['value']:.3g} {op} tol {chk['tol']:.3g}"
    return f"{text}: {detail}" if detail else text


def check_state(row: dict[str, Any]) -> str | None:
    """``"ok"``, ``"failed"`` (the output differs), ``"not checked"`` (no truth, or no memory to
    compare: older result files recorded an out-of-memory comparison as a failure) or None."""
    chk = row.get("check") or {}
    if chk.get("ok") is True:
        return "ok"
    if chk.get("ok") is False:
        return "not checked" if _OOM in (chk.get("detail") or "") and chk.get("value") is None else "failed"
    return "not checked" if chk.get("detail") else None


def bound_unit(row: dict[str, Any]) -> str | None:
    """``"TF/s"`` for a compute-bound row (by the roofline), ``"GB/s"`` otherwise; None if untimed."""
    if row.get("tflops") and row.get("bound") != "memory":
        return "TF/s"
    return "GB/s" if row.get("gbps") else None


def _rate(row: dict[str, Any]) -> str:
    unit = bound_unit(row)
    if unit is None:
        return ""
    return f"{row['tflops' if unit == 'TF/s' else 'gbps']:.3g} {unit}"


def ceiling_flag(row: dict[str, Any], data: dict[str, Any]) -> str | None:
    """Why a row reads above a measured ceiling (None when it does not): the likely reason."""
    if not any((row.get(k) or 0) > 1.0 for k in ("frac_roofline", "frac_compute", "frac_bandwidth")):
        return None
    ceilings = data.get("ceilings", {})
    if row.get("same_function") is False and row.get("bound") == "memory":
        return ("a baseline doing other work than the op " + (f"({row['note']}) " if row.get("note") else "") +
                "measured with the op's byte count, which overstates what it moves")
    if row.get("bound") == "memory" and (row.get("frac_compute") or 0) > 1.0:
        return "a memory-bound row above the compute roof: its FLOP count overstates the work"
    if row.get("bound") == "memory" or (row.get("frac_bandwidth") or 0) > 1.0:
        bw = ceilings.get("copy", {}).get("value") or 0.0
        mib = (row.get("bytes") or 0) / 2**20
        l2 = (data.get("environment") or {}).get("l2_cache_mib")
        if l2 and mib <= 2 * l2 and row.get("rotation", 1) <= 1 and not row.get("l2_flush"):
            return (f"{mib:.3g} MiB of data that can stay in the {l2:.3g} MiB L2 cache between calls: above the DRAM "
                    f"copy bandwidth ({bw:.4g} GB/s)")
        return (f"above the measured copy bandwidth ({bw:.4g} GB/s): a copy reads and writes in equal parts, and a "
                "read-mostly kernel can move more")
    name = row.get("compute_ceiling") or "matmul"
    value = ceilings.get(name, {}).get("value")
    at = f" ({value:.4g} TF/s)" if value else ""
    return (f"faster than the {name} ceiling measured at the start of the run{at}: that one torch.matmul is a "
            "measurement, not the GPU's peak (clocks and the power cap differ between calls)")


# ---------------------------------------------------------------------- labels
def _short_date(date: str | None) -> str:
    m = re.match(r"(\d{4}-\d\d-\d\d)T(\d\d:\d\d)", date or "")
    return f"{m[1]} {m[2]}" if m else (date or "?")


def run_names(paths: Sequence[str | os.PathLike]) -> list[str]:
    """A short name per run: its folder where the file names are equal (two ``bench.json``), else
    the file's stem; the whole path where those collide too."""
    ps = [Path(p) for p in paths]
    stems = [p.stem for p in ps]
    names = [(p.resolve().parent.name or str(p.parent)) for p in ps] if len(set(stems)) < len(stems) else stems
    return names if len(set(names)) == len(names) else [str(p) for p in ps]


def run_label(name: str, data: dict[str, Any]) -> str:
    """``<name> (git <ref>, <date>)``: how the report introduces a run."""
    env = data.get("environment", {})
    return f"{name} (git {str(env.get('git_ref') or '?')[:12]}, {_short_date(env.get('date'))})"


def _run_line(data: dict[str, Any], name: str) -> str:
    env = data.get("environment", {})
    nvml = env.get("nvml") or {}
    driver = f", driver {nvml['driver']}" if nvml.get("available") else ""
    methods = sorted({r.get("method") for r in data.get("rows", []) if r.get("method")})
    return (f"**{run_label(name, data)}**: {env.get('device', '?')}{driver}; torch {env.get('torch')}, triton "
            f"{env.get('triton')}; git {env.get('git_ref')}; {env.get('date')}; timer: {', '.join(methods) or '-'}")


def _ceiling_text(c: dict[str, Any] | None) -> str:
    if not c:
        return "-"
    if "value" in c:
        return f"{c['value']:.4g} {c['unit']}"
    return f"skipped ({c.get('skipped', '')})"


def _time(ms: float | None) -> str:
    if ms is None:
        return "-"
    if ms < 1:
        return f"{ms * 1e3:.1f} µs"
    return f"{ms:.2f} ms" if ms < 1000 else f"{ms / 1e3:.2f} s"


# ---------------------------------------------------------------------- markdown
Key = tuple[str, str, str, str]  # op, set, problem, impl


def _index(rows: list[dict[str, Any]]) -> dict[Key, dict[str, Any]]:
    return {(r["op"], r["set"], r["problem"], r["impl"]): r for r in rows}


def _cell(row: dict[str, Any], flag: int | None = None) -> str:
    if row["status"] != "ok":
        if row["status"] == "skipped" and _OOM in (row.get("reason") or ""):
            return "skipped (out of memory)"
        return row["status"]
    parts = [_time(row.get("median_ms")), _rate(row)]
    if row.get("frac_roofline") is not None:
        parts.append(f"{100 * row['frac_roofline']:.0f}%" + (f" ⚠{flag}" if flag is not None else ""))
    if (row.get("graph") or {}).get("median_ms"):
        parts.append(f"graph {_time(row['graph']['median_ms'])}")
    mark = {"failed": " ✗", "not checked": " (not checked)"}.get(check_state(row) or "", "")
    return " · ".join(p for p in parts if p) + mark


def _speedup(rows: dict[Key, dict[str, Any]], key: tuple[str, str, str]) -> str:
    r = rows.get((*key, "moela"))
    if r is None or not r.get("speedup") or r.get("baseline") in (None, "moela"):
        return "-"
    return f"×{r['speedup']:.2f} vs {r['baseline']}"


def markdown(runs: Sequence[tuple[str, dict[str, Any]]], plots: Sequence[str] = ()) -> str:
    """The report's markdown for one run, or two compared (cells read "A → B (×B's speed over A's)")."""
    names = [n for n, _ in runs]
    lines = ["# moela benchmark report", ""]
    lines += [f"- {_run_line(d, n)}" for n, d in runs]
    if any(r.get("method", "").startswith("cpu") for _, d in runs for r in d.get("rows", [])):
        lines += ["", "> CPU wall-clock numbers (moela kernels through the Triton interpreter): they show that "
                      "everything runs, and nothing about GPU speed."]
    lines += ["", "## Ceilings (measured at the start of each run)", "",
              "| ceiling | " + " | ".join(names) + " |", "|---|" + "---|" * len(runs)]
    keys = [k for _, d in runs for k in d.get("ceilings", {})]
    for k in dict.fromkeys(keys):
        lines.append(f"| {k} | " + " | ".join(_ceiling_text(d.get("ceilings", {}).get(k)) for _, d in runs) + " |")

    indexed = [_index(d.get("rows", [])) for _, d in runs]
    flags: dict[tuple[int, str], list[str]] = {}  # (run, reason) -> the rows it explains; numbered in order
    flag_of: dict[tuple[int, Key], int] = {}
    for i, ((_, data), idx) in enumerate(zip(runs, indexed, strict=True)):
        for key, r in idx.items():
            why = ceiling_flag(r, data) if r["status"] == "ok" else None
            if why:
                flags.setdefault((i, why), []).append(f"{key[0]} {key[2]} / {key[3]}")
                flag_of[(i, key)] = list(flags).index((i, why)) + 1

    two = len(runs) > 1
    lines += ["", "Cells: median time · throughput in the unit that bounds the row (TF/s compute-bound, GB/s "
                  "memory-bound, by the roofline) · share of the roofline (the slower of FLOPs at the measured matmul "
                  "rate and bytes at the measured copy bandwidth, over the time; ⚠n: above a ceiling, see the list "
                  "below) · graph: the median of CUDA-graph replays; ✗ = output differs from the reference."
              + (f" Two runs: {names[0]} → {names[1]} (×: {names[1]}'s speed over {names[0]}'s); a dash marks a row "
                 "the other run does not have. Speedups are each run's own, over its own baseline." if two else "")]
    ops = list(dict.fromkeys(k[0] for idx in indexed for k in idx))
    for op in ops:
        keys_op = list(dict.fromkeys(k for idx in indexed for k in idx if k[0] == op))
        impls = list(dict.fromkeys(k[3] for k in keys_op))
        problems = list(dict.fromkeys(k[1:3] for k in keys_op))
        lines += ["", f"## {op}", "", "| set | problem | " + " | ".join(impls) + " | moela speedup |",
                  "|---|---|" + "---|" * (len(impls) + 1)]
        for s, p in problems:
            cells = []
            for impl in impls:
                key = (op, s, p, impl)
                rs = [idx.get(key) for idx in indexed]
                texts = ["—" if r is None else _cell(r, flag_of.get((i, key))) for i, r in enumerate(rs)]
                text = " → ".join(texts) if two else texts[0]
                if two and all(r is not None and r.get("median_ms") for r in rs):
                    text += f" (×{rs[0]['median_ms'] / rs[1]['median_ms']:.2f})"
                cells.append("" if all(r is None for r in rs) else text)
            speed = " → ".join(_speedup(idx, (op, s, p)) for idx in indexed)
            lines.append(f"| {s} | {p} | " + " | ".join(cells) + f" | {speed} |")
    if flags:
        lines += ["", "## Above a ceiling", ""]
        for n, ((i, why), rows) in enumerate(flags.items(), 1):
            lines.append(f"- ⚠{n}" + (f" ({names[i]})" if two else "") + f": {why}. Rows: {'; '.join(rows)}")
    lines += _notes(runs)
    if plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(lines) + "\n"


def _notes(runs: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
    out = ["", "## Skipped, errors, checks, telemetry", ""]
    for name, data in runs:
        reasons: dict[tuple[str, str, str, str], int] = defaultdict(int)
        for r in data.get("rows", []):
            if r["status"] != "ok":
                reasons[(r["op"], r["impl"], r["status"], r.get("reason", ""))] += 1
            state = check_state(r)
            if state in ("failed", "not checked"):
                label = "check failed" if state == "failed" else "not checked"
                reasons[(r["op"], r["impl"], label, check_text(r["check"]))] += 1
        out += [f"**{name}**", ""]
        if not reasons:
            out.append("- nothing skipped, no errors, every checked output matched")
        for (op, impl, status, reason), n in sorted(reasons.items()):
            out.append(f"- {op} / {impl}: {status} ×{n} — {reason}")
        stats = data.get("stats", {})
        if stats.get("problems_left_out"):
            out.append(f"- time budget: {stats['problems_left_out']} problems not run")
        for what, why in (stats.get("graph_not_capturable") or {}).items():
            out.append(f"- CUDA graph replay not timed for {what}: {why}")
        if stats.get("seconds_by_op"):
            spent = ", ".join(f"{op} {sec:.0f} s" for op, sec in stats["seconds_by_op"].items())
            out.append(f"- wall time by op (inputs, compiling, tuning, timing, checks): {spent}")
        peaks = [r["memory"]["peak_mib"] for r in data.get("rows", []) if (r.get("memory") or {}).get("peak_mib")]
        if peaks:
            out.append(f"- peak GPU memory of the timed calls: up to {max(peaks) / 1024:.3g} GiB")
        tel = [r["telemetry"] for r in data.get("rows", []) if r.get("telemetry")]
        if tel:
            throttled = sum(1 for t in tel if t.get("throttled"))
            why = sorted({x for t in tel for x in (t.get("throttle_reasons") or [])})
            clock = f"{min(t['sm_clock_mhz_min'] for t in tel)}-{max(t['sm_clock_mhz_max'] for t in tel)} MHz"
            peak = f"{max(t['power_w_max'] for t in tel):.0f} W, {max(t['temperature_c_max'] for t in tel)} C"
            out.append(f"- telemetry: SM clock {clock}, peak {peak}; throttled during {throttled} of {len(tel)} "
                       f"timings" + (f" ({', '.join(why)})" if why else ""))
        else:
            out.append(f"- telemetry: none ({stats.get('telemetry', 'no NVML')})")
        out.append("")
    return out


# ---------------------------------------------------------------------- plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _timed(data: dict[str, Any], **match: str) -> list[dict[str, Any]]:
    return [r for r in data.get("rows", []) if r["status"] == "ok" and bound_unit(r)
            and all(r.get(k) == v for k, v in match.items())]


def _throughput_plot(op: str, runs: Sequence[tuple[str, dict[str, Any]]], path: Path) -> bool:
    """One figure for ``op``: a panel per (series, bound), the runs overlaid."""
    from matplotlib.lines import Line2D

    per_run = [_timed(d, op=op) for _, d in runs]
    panels = list(dict.fromkeys((r["series"] or r["set"], bound_unit(r)) for rows in per_run for r in rows))
    if not panels:
        return False
    plt = _pyplot()
    ncols = min(2, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 3.6 * nrows), squeeze=False)
    impls = list(dict.fromkeys(r["impl"] for rows in per_run for r in rows))
    colors = {impl: f"C{i % 10}" for i, impl in enumerate(impls)}
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (series, unit) in zip(axes.flat, panels, strict=False):
        key = "tflops" if unit == "TF/s" else "gbps"
        mine = [[r for r in rows if (r["series"] or r["set"]) == series and bound_unit(r) == unit] for rows in per_run]
        by_tokens = all(r.get("tokens") for rows in mine for r in rows)
        problems = list(dict.fromkeys(r["problem"] for rows in mine for r in rows))
        shown: dict[str, str] = {}  # impl -> kind, in this panel
        ceiling_name = ""
        for j, ((_, data), rows) in enumerate(zip(runs, mine, strict=True)):
            for impl in impls:
                pts = sorted((r["tokens"] if by_tokens else problems.index(r["problem"]), r[key])
                             for r in rows if r["impl"] == impl)
                if pts:
                    kind = next(r["kind"] for r in rows if r["impl"] == impl)
                    ax.plot(*zip(*pts, strict=True), _RUN_STYLE[j % 2], marker=_KIND_MARKER.get(kind, "."),
                            color=colors[impl])
                    shown.setdefault(impl, kind)
            ceiling = _plot_ceiling(data, rows, unit == "TF/s")
            if ceiling:
                ax.axhline(ceiling[1], color="grey", linestyle=_RUN_STYLE[j % 2], linewidth=0.8)
                ceiling_name = ceiling[0]
        if by_tokens:
            ax.set_xscale("log", base=2)
            ax.set_xlabel("tokens")
        else:
            ax.set_xticks(range(len(problems)))
            ax.set_xticklabels(problems, rotation=20, ha="right", fontsize=6)
        ax.set_yscale("log")
        ax.set_title(f"{op}: {series} ({'compute' if unit == 'TF/s' else 'memory'}-bound)", fontsize=9)
        ax.set_ylabel({"TF/s": "TFLOP/s", "GB/s": "GB/s"}[unit])
        ax.grid(True, which="both", alpha=0.3)
        handles = [Line2D([], [], color=colors[i], marker=_KIND_MARKER.get(k, "."), label=i) for i, k in shown.items()]
        if ceiling_name:
            handles.append(Line2D([], [], color="grey", linewidth=0.8, label=f"ceiling: {ceiling_name}"))
        if len(runs) > 1:
            handles += [Line2D([], [], color="black", linestyle=_RUN_STYLE[j], label=name)
                        for j, (name, _) in enumerate(runs)]
        ax.legend(handles=handles, fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def _plot_ceiling(data: dict[str, Any], rows: list[dict[str, Any]], flops: bool) -> tuple[str, float] | None:
    ceilings = data.get("ceilings", {})
    if flops:
        name = next((r.get("compute_ceiling") for r in rows if r.get("compute_ceiling")), None)
        c = ceilings.get(name or "", {})
        return (name, c["value"]) if "value" in c else None
    c = ceilings.get("copy", {})
    return ("copy", c["value"]) if "value" in c else None


def _op_legends(ax, plt, ops: list[str], colors: dict[str, Any], kinds: list[str]) -> None:
    """Two compact legends beside the axes: one entry per op (its colour), one per kind (its marker)."""
    from matplotlib.lines import Line2D

    op_handles = [Line2D([], [], color=colors[op], marker="o", linestyle="", label=op) for op in ops]
    kind_handles = [Line2D([], [], color="black", marker=_KIND_MARKER.get(k, "."), linestyle="", label=k)
                    for k in kinds]
    first = ax.legend(handles=op_handles, title="op", fontsize=6, title_fontsize=7, loc="upper left",
                      bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.add_artist(first)
    ax.legend(handles=kind_handles + [h for h in ax.get_legend_handles_labels()[0] if h.get_label().startswith("roof")],
              title="implementation", fontsize=6, title_fontsize=7, loc="lower left", bbox_to_anchor=(1.01, 0.0),
              borderaxespad=0)


def _scatter_plot(runs, path: Path, rows_of, xy, xlabel: str, ylabel: str, title: str, roofs) -> bool:
    per_run = [rows_of(d) for _, d in runs]
    if not any(per_run):
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(runs), figsize=(8 * len(runs), 5.5), squeeze=False, sharey=True)
    ops = list(dict.fromkeys(r["op"] for rows in per_run for r in rows))
    kinds = list(dict.fromkeys(r["kind"] for rows in per_run for r in rows))
    palette = plt.get_cmap("tab20")
    colors = {op: palette(i % 20) for i, op in enumerate(ops)}
    for ax, (name, data), rows in zip(axes[0], runs, per_run, strict=True):
        roofs(ax, data, rows)
        for r in rows:
            ax.scatter(*xy(r), marker=_KIND_MARKER.get(r["kind"], "."), color=colors[r["op"]], s=18)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title} ({name})", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        _op_legends(ax, plt, ops, colors, kinds)
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return True


def _roofline_plot(runs: Sequence[tuple[str, dict[str, Any]]], path: Path) -> bool:
    def roofs(ax, data, rows):
        xs = [r["intensity"] for r in rows] or [1.0]
        lo, hi = min(xs) / 2, max(xs) * 2
        bw = data.get("ceilings", {}).get("copy", {}).get("value")
        for i, cname in enumerate(("matmul_bf16", "matmul_fp8", "matmul_fp32")):
            c = data.get("ceilings", {}).get(cname, {})
            if "value" in c and bw:
                grid = [lo * (hi / lo) ** (k / 64) for k in range(65)]
                ax.plot(grid, [min(c["value"], bw * x / 1e3) for x in grid], ("--", ":", "-.")[i], color="grey",
                        linewidth=1, label=f"roof: {cname} {c['value']:.3g} TF/s, copy {bw:.3g} GB/s")

    return _scatter_plot(runs, path, lambda d: [r for r in _timed(d) if r.get("tflops") and r.get("intensity")],
                         lambda r: (r["intensity"], r["tflops"]), "arithmetic intensity (FLOP / byte, fewest bytes)",
                         "TFLOP/s", "roofline", roofs)


def _bandwidth_plot(runs: Sequence[tuple[str, dict[str, Any]]], path: Path) -> bool:
    def roofs(ax, data, rows):
        bw = data.get("ceilings", {}).get("copy", {}).get("value")
        if bw:
            ax.axhline(bw, color="grey", linestyle="--", linewidth=1, label=f"roof: copy {bw:.3g} GB/s")

    return _scatter_plot(runs, path, lambda d: [r for r in _timed(d) if bound_unit(r) == "GB/s"],
                         lambda r: (r["bytes"], r["gbps"]), "bytes moved (fewest)", "GB/s", "memory-bound rows", roofs)


def write_report(paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike, plots: bool = True,
                 ops: Sequence[str] | None = None) -> tuple[Path, list[Path]]:
    """Write ``report.md`` (and the PNGs) for one or two result files into ``out_dir``;
    ``ops`` keeps only those ops' rows."""
    if not 1 <= len(paths) <= 2:
        raise ValueError(f"report takes one or two result files, got {len(paths)}")
    datas = [load_results(p) for p in paths]
    runs = list(zip(run_names(paths), datas, strict=True))
    if ops is not None:
        runs = [(n, {**d, "rows": [r for r in d.get("rows", []) if r["op"] in ops]}) for n, d in runs]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if plots:
        for op in dict.fromkeys(r["op"] for _, d in runs for r in d.get("rows", [])):
            p = out / f"throughput-{op}.png"
            if _throughput_plot(op, runs, p):
                written.append(p)
        for fn, fname in ((_roofline_plot, "roofline.png"), (_bandwidth_plot, "bandwidth.png")):
            if fn(runs, out / fname):
                written.append(out / fname)
    md = out / "report.md"
    md.write_text(markdown(runs, [str(p) for p in written]), encoding="utf-8")
    return md, written
