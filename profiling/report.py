"""Reports from result files: a markdown table per op and PNG plots, for one run or two side by side.

``write_report([a.json], out_dir)`` or ``write_report([a.json, b.json], out_dir)`` writes
``report.md``, ``throughput-<op>.png`` (throughput vs tokens per series, one line per
implementation, the run's ceiling dashed; a column per run), ``roofline.png`` (TFLOP/s vs
arithmetic intensity under the measured ceilings) and ``bandwidth.png`` (GB/s of the
memory-bound ops against the measured copy bandwidth).
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .results import load_results

__all__ = ["write_report", "markdown"]

_KIND_MARKER = {"moela": "o", "reference": "x", "torch": "^"}


# ---------------------------------------------------------------------- formatting
def _time(ms: float | None) -> str:
    if ms is None:
        return "-"
    if ms < 1:
        return f"{ms * 1e3:.1f} µs"
    return f"{ms:.2f} ms" if ms < 1000 else f"{ms / 1e3:.2f} s"


def _rate(row: dict[str, Any]) -> str:
    """TFLOP/s where the roofline says compute-bound, else GB/s."""
    if row.get("tflops") and row.get("bound") != "memory":
        return f"{row['tflops']:.3g} TF/s"
    if row.get("gbps"):
        return f"{row['gbps']:.3g} GB/s"
    return ""


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return ""
    if row["status"] != "ok":
        return row["status"]
    parts = [_time(row.get("median_ms")), _rate(row)]
    if row.get("frac_roofline") is not None:
        parts.append(f"{100 * row['frac_roofline']:.0f}%")
    if (row.get("graph") or {}).get("median_ms"):
        parts.append(f"graph {_time(row['graph']['median_ms'])}")
    chk = row.get("check") or {}
    mark = " ✗" if chk.get("ok") is False else ""
    return " · ".join(p for p in parts if p) + mark


def _run_label(data: dict[str, Any], name: str) -> str:
    env = data.get("environment", {})
    nvml = env.get("nvml") or {}
    driver = f", driver {nvml['driver']}" if nvml.get("available") else ""
    methods = sorted({r.get("method") for r in data.get("rows", []) if r.get("method")})
    return (f"**{name}**: {env.get('device', '?')}{driver}; torch {env.get('torch')}, triton {env.get('triton')}; "
            f"git {env.get('git_ref')}; {env.get('date')}; timer: {', '.join(methods) or '-'}")


def _ceiling_text(c: dict[str, Any] | None) -> str:
    if not c:
        return "-"
    if "value" in c:
        return f"{c['value']:.4g} {c['unit']}"
    return f"skipped ({c.get('skipped', '')})"


# ---------------------------------------------------------------------- markdown
def _index(rows: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    return {(r["op"], r["set"], r["problem"], r["impl"]): r for r in rows}


def markdown(runs: Sequence[tuple[str, dict[str, Any]]], plots: Sequence[str] = ()) -> str:
    """The report's markdown for one run, or two compared (cells read "A → B (×B-speedup)")."""
    names = [n for n, _ in runs]
    lines = ["# moela benchmark report", ""]
    lines += [f"- {_run_label(d, n)}" for n, d in runs]
    cpu = any(r.get("method", "").startswith("cpu") for _, d in runs for r in d.get("rows", []))
    if cpu:
        lines += ["", "> CPU wall-clock numbers (moela kernels through the Triton interpreter): they show that "
                      "everything runs, and nothing about GPU speed."]
    lines += ["", "## Ceilings (measured at the start of each run)", "",
              "| ceiling | " + " | ".join(names) + " |", "|---|" + "---|" * len(runs)]
    keys = [k for _, d in runs for k in d.get("ceilings", {})]
    for k in dict.fromkeys(keys):
        lines.append(f"| {k} | " + " | ".join(_ceiling_text(d.get("ceilings", {}).get(k)) for _, d in runs) + " |")

    base_rows = runs[0][1].get("rows", [])
    other = _index(runs[1][1].get("rows", [])) if len(runs) > 1 else {}
    by_op: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in base_rows:
        by_op[r["op"]].append(r)
    if len(runs) > 1:  # rows only in the second run still get a table
        known = _index(base_rows)
        for key, r in other.items():
            if key not in known:
                by_op[r["op"]].append({**r, "status": "absent", "_only_b": True})

    lines += ["", "Cells: median time · throughput · fraction of the roofline (the larger of FLOPs / measured "
                  "matmul rate and bytes / measured copy bandwidth, over the time) · graph: the median of "
                  "CUDA-graph replays (bench --graphs: device time without the host's launch work); ✗ = output "
                  "differs from the reference."
              + (f" Two runs: {names[0]} → {names[1]} (×speedup of {names[1]})." if other else "")]
    for op, rows in by_op.items():
        impls = list(dict.fromkeys(r["impl"] for r in rows))
        problems = list(dict.fromkeys((r["set"], r["problem"]) for r in rows))
        cells = _index(rows)
        lines += ["", f"## {op}", "", "| set | problem | " + " | ".join(impls) + " | speedup |",
                  "|---|---|" + "---|" * (len(impls) + 1)]
        for s, p in problems:
            row_cells = []
            speedup = ""
            for impl in impls:
                a = cells.get((op, s, p, impl))
                if a is not None and a.get("_only_b"):
                    a = None
                text = _cell(a)
                b = other.get((op, s, p, impl))
                if other:
                    if b is not None and a is not None and a.get("median_ms") and b.get("median_ms"):
                        text = f"{text} → {_cell(b)} (×{a['median_ms'] / b['median_ms']:.2f})"
                    elif b is not None:
                        text = f"{text or '-'} → {_cell(b)}"
                if impl == "moela" and a is not None and a.get("speedup") and a.get("baseline") != "moela":
                    speedup = f"×{a['speedup']:.2f} vs {a['baseline']}"
                row_cells.append(text)
            lines.append(f"| {s} | {p} | " + " | ".join(row_cells) + f" | {speedup} |")
    lines += _notes(runs)
    if plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(lines) + "\n"


def _notes(runs: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
    out = ["", "## Skipped, errors, failed checks, telemetry", ""]
    for name, data in runs:
        reasons: dict[tuple[str, str, str, str], int] = defaultdict(int)
        for r in data.get("rows", []):
            if r["status"] != "ok":
                reasons[(r["op"], r["impl"], r["status"], r.get("reason", ""))] += 1
            chk = r.get("check") or {}
            if chk.get("ok") is False:
                reasons[(r["op"], r["impl"], "check failed",
                         f"{chk.get('metric')} {chk.get('value')} > {chk.get('tol')} {chk.get('detail', '')}")] += 1
        out.append(f"**{name}**")
        out.append("")
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


def _series_key(rows: list[dict[str, Any]]) -> tuple[str, str]:
    """Plot a series in TFLOP/s if most of its points are compute-bound, else in GB/s."""
    compute = sum(1 for r in rows if r.get("tflops") and r.get("bound") != "memory")
    return ("tflops", "TFLOP/s") if compute * 2 > len(rows) else ("gbps", "GB/s")


def _throughput_plot(op: str, runs: Sequence[tuple[str, dict[str, Any]]], path: Path) -> bool:
    per_run = [[r for r in d.get("rows", []) if r["op"] == op and r["status"] == "ok" and r.get("tokens")]
               for _, d in runs]
    series = list(dict.fromkeys(r["series"] for rows in per_run for r in rows))
    if not series:
        return False
    plt = _pyplot()
    ncols = len(runs)
    fig, axes = plt.subplots(len(series), ncols, figsize=(5.5 * ncols, 3.2 * len(series)), squeeze=False,
                             sharey="row")
    impls = list(dict.fromkeys(r["impl"] for rows in per_run for r in rows))
    colors = {impl: f"C{i % 10}" for i, impl in enumerate(impls)}
    for i, s in enumerate(series):
        key, unit = _series_key([r for rows in per_run for r in rows if r["series"] == s])
        for j, ((name, data), rows) in enumerate(zip(runs, per_run, strict=True)):
            ax = axes[i][j]
            mine = [r for r in rows if r["series"] == s]
            for impl in impls:
                pts = sorted((r["tokens"], r[key]) for r in mine if r["impl"] == impl and r.get(key))
                if pts:
                    kind = next(r["kind"] for r in mine if r["impl"] == impl)
                    ax.plot(*zip(*pts, strict=True), marker=_KIND_MARKER.get(kind, "."), color=colors[impl],
                            label=impl)
            ceiling = _plot_ceiling(data, mine, key == "tflops")
            if ceiling:
                ax.axhline(ceiling[1], color="grey", linestyle="--", linewidth=1, label=ceiling[0])
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{op}: {s}" + (f" ({name})" if ncols > 1 else ""), fontsize=9)
            ax.set_xlabel("tokens")
            ax.set_ylabel(unit)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
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


def _roofline_plot(runs: Sequence[tuple[str, dict[str, Any]]], path: Path) -> bool:
    per_run = [[r for r in d.get("rows", []) if r["status"] == "ok" and r.get("tflops") and r.get("intensity")]
               for _, d in runs]
    if not any(per_run):
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(runs), figsize=(10.5 * len(runs), 5.5), squeeze=False, sharey=True)
    ops = list(dict.fromkeys(r["op"] for rows in per_run for r in rows))
    palette = plt.get_cmap("tab20")  # one color per op (more than 10 ops: tab10 would repeat)
    colors = {op: palette(i % 20) for i, op in enumerate(ops)}
    for j, ((name, data), rows) in enumerate(zip(runs, per_run, strict=True)):
        ax = axes[0][j]
        xs = [r["intensity"] for r in rows] or [1.0]
        lo, hi = min(xs) / 2, max(xs) * 2
        bw = data.get("ceilings", {}).get("copy", {}).get("value")
        for cname in ("matmul_bf16", "matmul_fp8", "matmul_fp32"):
            c = data.get("ceilings", {}).get(cname, {})
            if "value" in c and bw:
                grid = [lo * (hi / lo) ** (i / 64) for i in range(65)]
                ax.plot(grid, [min(c["value"], bw * x / 1e3) for x in grid], "--", linewidth=1,
                        label=f"roof: {cname} {c['value']:.3g} TF/s, copy {bw:.3g} GB/s")
        for op in ops:
            for kind, marker in _KIND_MARKER.items():
                pts = [(r["intensity"], r["tflops"]) for r in rows if r["op"] == op and r["kind"] == kind]
                if pts:
                    ax.scatter(*zip(*pts, strict=True), marker=marker, color=colors[op], s=18,
                               label=f"{op} ({kind})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("arithmetic intensity (FLOP / byte, fewest bytes)")
        ax.set_ylabel("TFLOP/s")
        ax.set_title(f"roofline ({name})", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # beside the points
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")  # keeps the legend beside the axes
    plt.close(fig)
    return True


def _bandwidth_plot(runs: Sequence[tuple[str, dict[str, Any]]], path: Path) -> bool:
    per_run = [[r for r in d.get("rows", []) if r["status"] == "ok" and not r.get("tflops") and r.get("gbps")]
               for _, d in runs]
    if not any(per_run):
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(runs), figsize=(7 * len(runs), 4.5), squeeze=False, sharey=True)
    ops = list(dict.fromkeys(r["op"] for rows in per_run for r in rows))
    colors = {op: f"C{i % 10}" for i, op in enumerate(ops)}
    for j, ((name, data), rows) in enumerate(zip(runs, per_run, strict=True)):
        ax = axes[0][j]
        for op in ops:
            for kind, marker in _KIND_MARKER.items():
                pts = [(r["bytes"], r["gbps"]) for r in rows if r["op"] == op and r["kind"] == kind]
                if pts:
                    ax.scatter(*zip(*pts, strict=True), marker=marker, color=colors[op], s=18, label=f"{op} ({kind})")
        bw = data.get("ceilings", {}).get("copy", {}).get("value")
        if bw:
            ax.axhline(bw, color="grey", linestyle="--", linewidth=1, label=f"copy {bw:.3g} GB/s")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("bytes moved (fewest)")
        ax.set_ylabel("GB/s")
        ax.set_title(f"memory-bound ops ({name})", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def write_report(paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike, plots: bool = True,
                 ops: Sequence[str] | None = None) -> tuple[Path, list[Path]]:
    """Write ``report.md`` (and the PNGs) for one or two result files into ``out_dir``;
    ``ops`` keeps only those ops' rows."""
    if not 1 <= len(paths) <= 2:
        raise ValueError(f"report takes one or two result files, got {len(paths)}")
    runs = [(_name(p, i, len(paths)), load_results(p)) for i, p in enumerate(paths)]
    if ops is not None:
        runs = [(n, {**d, "rows": [r for r in d.get("rows", []) if r["op"] in ops]}) for n, d in runs]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if plots:
        ops = list(dict.fromkeys(r["op"] for _, d in runs for r in d.get("rows", [])))
        for op in ops:
            p = out / f"throughput-{op}.png"
            if _throughput_plot(op, runs, p):
                written.append(p)
        for fn, fname in ((_roofline_plot, "roofline.png"), (_bandwidth_plot, "bandwidth.png")):
            if fn(runs, out / fname):
                written.append(out / fname)
    md = out / "report.md"
    md.write_text(markdown(runs, [str(p) for p in written]), encoding="utf-8")
    return md, written


def _name(path: str | os.PathLike, i: int, n: int) -> str:
    stem = Path(path).stem
    return stem if n == 1 else f"{'AB'[i]}: {stem}"

