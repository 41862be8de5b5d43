"""``python -m moela.profiling``: check the moela kernels, benchmark them against their
references and torch baselines, write reports.

    python -m moela.profiling                  environment, check, ceilings + quick benchmark,
                                               reference layers; results saved (minutes on a CPU)
    python -m moela.profiling --only OP ...    the same, on these ops only
    python -m moela.profiling check            each available moela kernel against its reference
    python -m moela.profiling bench            ceilings, then every implementation of every problem
    python -m moela.profiling report A.json [B.json]   markdown + PNG plots (two runs side by side)
    python -m moela.profiling layers           the reference MoE / MLA layers, timed
    python -m moela.profiling list             ops, shape sets, implementations, kernel status
    python -m moela.profiling audit            every Triton kernel compiled for sm_90/sm_100 (no GPU
                                               needed), judged by moela.profiling.audit's rules

Without CUDA, kernels run through the Triton interpreter and every time is CPU wall clock:
such numbers show that things run, and nothing about GPU speed (the main job times each
interpreted kernel once, right after its check ran it).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import audit
from .report import check_text

DEFAULT_OUT = "moela-results"
DTYPES = ("float32", "bfloat16", "float64")


# ---------------------------------------------------------------------- argument types
def _positive(kind: type):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return v

    return parse


def _default(value: Any, sub: bool) -> Any:
    """Subcommands repeat the top-level flags without a default of their own, so that
    ``--device cpu bench`` and ``bench --device cpu`` mean the same."""
    return argparse.SUPPRESS if sub else value


def _add_device(p: argparse.ArgumentParser, sub: bool = False) -> None:
    p.add_argument("--device", default=_default("auto", sub), choices=("auto", "cpu", "cuda"),
                   help="auto: cuda if available, else cpu (kernels through the Triton interpreter)")


def _add_selection(p: argparse.ArgumentParser, sets_help: str) -> None:
    p.add_argument("--ops", nargs="+", metavar="OP", help="ops to run (default: all); see `list`")
    p.add_argument("--sets", nargs="+", metavar="SET", help=sets_help)
    p.add_argument("--impls", nargs="+", metavar="IMPL",
                   help="implementation names or kinds (moela, reference, torch, outside, all)")
    p.add_argument("--cpu-large", action="store_true",
                   help="allow DeepSeek-sized sets on a CPU (gigabytes of inputs; the interpreter takes hours)")


def _add_output(p: argparse.ArgumentParser, sub: bool = False) -> None:
    p.add_argument("--out", default=_default(DEFAULT_OUT, sub),
                   help=f"folder for the JSON and CSV results (default: ./{DEFAULT_OUT})")
    p.add_argument("--name", default=_default(None, sub),
                   help="file stem of the results (default: <kind>-<device>-<date>)")
    p.add_argument("--no-save", action="store_true", default=_default(False, sub), help="print only, write no files")
    _add_progress(p, sub)


def _add_progress(p: argparse.ArgumentParser, sub: bool = False) -> None:
    p.add_argument("--no-progress", action="store_true", default=_default(False, sub), help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m moela.profiling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_device(parser)
    _add_output(parser)
    parser.add_argument("--no-layers", action="store_true", help="skip the reference-layer timings")
    parser.add_argument("--only", nargs="+", metavar="OP", dest="main_ops",
                        help="the main job's check and benchmark on these ops only (default: all)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    parser.subcommands = {}  # name -> subparser, for errors in the subcommand's own usage

    c = parser.subcommands["check"] = sub.add_parser(
        "check", help="each available moela kernel against its reference")
    _add_device(c, sub=True)
    _add_selection(c, "shape sets (default: tiny on CPU, check on CUDA)")
    _add_progress(c, sub=True)

    b = parser.subcommands["bench"] = sub.add_parser(
        "bench", help="ceilings, then every implementation of every problem")
    _add_device(b, sub=True)
    _add_selection(b, "shape sets, or `full` (every op-specific set) or `all` (default: tiny on CPU, full on CUDA)")
    _add_output(b, sub=True)
    b.add_argument("--warmup-ms", type=_positive(float), default=10.0,
                   help="warm-up time per measurement (CUDA)")
    b.add_argument("--rep-ms", type=_positive(float), default=None,
                   help="time spent repeating each measurement (default: 40 on CUDA, 100 on CPU)")
    b.add_argument("--time-budget", type=_positive(float), metavar="SECONDS",
                   help="stop starting new problems after this long (the results say how many were left out)")
    b.add_argument("--interleave", action="store_true",
                   help="ops take turns (each op's first problem, then each op's second, ...): with --time-budget, "
                        "every op keeps its most important problems")
    b.add_argument("--graphs", action="store_true",
                   help="CUDA: also time CUDA-graph replays of every non-reference row under 1 ms (device time "
                        "without the host's launch work, as in a graph-captured decode step)")
    b.add_argument("--no-ceilings", action="store_true", help="do not measure the ceilings first")
    b.add_argument("--no-verify", action="store_true", help="do not check outputs against the reference")
    b.add_argument("--no-telemetry", action="store_true", help="no NVML sampling around the timings")
    b.add_argument("--allow-busy", action="store_true",
                   help="time even when another process holds the GPU (the rows are flagged; refused otherwise)")
    b.add_argument("--seed", type=int, default=0, help="seed of the random inputs")

    r = parser.subcommands["report"] = sub.add_parser(
        "report", help="markdown + PNG plots from one or two result files")
    r.add_argument("results", nargs="+", metavar="RESULT.json", help="one result file, or two to compare")
    r.add_argument("--out", help="folder for report.md and the PNGs (default: <first result>-report/)")
    r.add_argument("--no-plots", action="store_true", help="markdown only")
    r.add_argument("--ops", nargs="+", metavar="OP", help="report only these ops")

    la = parser.subcommands["layers"] = sub.add_parser(
        "layers", help="time the reference MoE and MLA layers of some configs")
    _add_device(la, sub=True)
    la.add_argument("--configs", nargs="+", default=["tiny", "deepseek-v2-lite"],
                    help="preset names or DeepSeek config JSON paths")
    la.add_argument("--tokens", type=_positive(int), default=64,
                    help="tokens through the MoE; prefill length of MLA")
    la.add_argument("--decode-steps", type=_positive(int), default=4)
    la.add_argument("--dtype", default="float32", choices=DTYPES)
    la.add_argument("--reps", type=_positive(int), default=3)

    tu = parser.subcommands["tune"] = sub.add_parser(
        "tune", help="GPU: autotune the kernels at the DeepSeek problems, write kernels/configs/<gpu>.json")
    _add_device(tu, sub=True)
    tu.add_argument("--ops", nargs="+", metavar="OP", help="ops whose kernels to tune (default: all)")
    tu.add_argument("--sets", nargs="+", metavar="SET", help="shape sets (default: full, the op-specific sets)")
    tu.add_argument("--budget-s", type=_positive(float), default=900.0,
                    help="stop starting new problems after this many seconds (default 900)")
    tu.add_argument("--table", default=None,
                    help="the table to write or merge into (default: the package's kernels/configs/<gpu>.json)")

    ls = parser.subcommands["list"] = sub.add_parser(
        "list", help="ops, shape sets, implementations, whether each kernel exists, and the MOELA_* switches")
    _add_device(ls, sub=True)
    ls.add_argument("--ops", nargs="+", metavar="OP", help="ops to list (default: all)")
    ls.add_argument("--names", action="store_true", help="only the op names, one per line (scripts read this)")
    ls.add_argument("--warm-groups", action="store_true",
                    help="the GPU script's compile warm-up groups, one line of op names each")

    au = parser.subcommands["audit"] = sub.add_parser(
        "audit", help="compile every Triton kernel for sm_90 (and sm_100) without a GPU and check it against the rules",
        description=audit.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    audit.build_parser(au)
    return parser


# ---------------------------------------------------------------------- setup
def resolve_device(parser: argparse.ArgumentParser, name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here (torch "
                     f"{torch.__version__}); use --device cpu or auto")
    return torch.device(name)


def setup_kernels(device) -> str:
    from moela import knobs

    """Turn the Triton interpreter on for a CPU run, before anything imports a kernel module,
    and install its compatibility layer. Returns a line saying how kernels run."""
    if device.type == "cpu":
        if any(m.startswith("moela.kernels.") for m in sys.modules) and not knobs.interpret():
            return "kernels: already imported without TRITON_INTERPRET=1; they will fail on CPU tensors"
        os.environ["TRITON_INTERPRET"] = "1"
    if importlib.util.find_spec("moela.kernels.interpreter") is not None:
        try:
            importlib.import_module("moela.kernels.interpreter").install_compat()
        except Exception as e:  # another triton: the layer refuses rather than hide the bugs
            return f"kernels: Triton interpreter WITHOUT the compatibility layer ({type(e).__name__}: {e})"
    return "kernels: Triton interpreter (CPU)" if device.type == "cpu" else "kernels: CUDA"


def _select(parser: argparse.ArgumentParser, ops_arg, sets_arg, impls_arg, default_sets: Sequence[str],
            device=None, cpu_large: bool = False, interleave: bool = False):
    from .registry import all_ops, make_plan

    ops = all_ops()
    names = ops_arg or list(ops)
    unknown = [n for n in names if n not in ops]
    if unknown:
        parser.error(f"unknown op(s) {', '.join(unknown)}; known ops: {', '.join(ops)}")
    chosen = [ops[n] for n in dict.fromkeys(names)]
    sets = sets_arg or list(default_sets)
    known_sets = {s for op in chosen for s in op.shape_sets} | {"full", "all"}
    bad = [s for s in sets if s not in known_sets]
    if bad:
        parser.error(f"unknown shape set(s) {', '.join(bad)} for the chosen ops; known: "
                     f"{', '.join(sorted(known_sets))}")
    if impls_arg:
        known_impls = {i.name for op in chosen for i in op.impls()} | {"moela", "reference", "torch", "outside", "all"}
        bad = [i for i in impls_arg if i not in known_impls]
        if bad:
            parser.error(f"unknown implementation(s) {', '.join(bad)}; known: {', '.join(sorted(known_impls))}")
    plan = make_plan(chosen, sets, interleave=interleave)
    large = sorted({p.set for _, p in plan if p.set != "tiny"})
    if device is not None and device.type == "cpu" and large and not cpu_large:
        parser.error(f"shape set(s) {', '.join(large)} are DeepSeek-sized: on a CPU only `tiny` runs "
                     "(add --cpu-large to try anyway)")
    if not plan:
        parser.error(f"the chosen ops have no problems in set(s) {', '.join(sets)}")
    return plan, sets


def _progress_enabled(args) -> bool:
    return not getattr(args, "no_progress", False) and sys.stderr.isatty()


# ---------------------------------------------------------------------- printing
CPU_NOTE = ("  CPU: every time is wall clock. moela rows (`interp`) run each Triton kernel through the interpreter, "
            "program by program in Python; torch rows run torch's CPU kernels. These numbers show that everything "
            "runs and what the host does, nothing about GPU speed, and a CPU speedup compares the interpreter with "
            "CPU torch.")


def _fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "-"
    return f"{ms * 1e3:.1f} us" if ms < 1 else f"{ms:.2f} ms"


def _opt(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def check_line(r: dict[str, Any]) -> str:
    chk = r.get("check") or {}
    value = check_text(chk) if chk else ""
    reason = r.get("reason", "") if r.get("reason", "") not in value else ""
    return f"  {r['status']:<7} {r['op']:<22} {r['impl']:<10} {r['set']}/{r['problem']:<40} {value} {reason}".rstrip()


def print_checks(rows: list[dict[str, Any]], lines: bool = True) -> None:
    """Every checked row (unless ``lines`` is False: they were streamed), then the skips summarised."""
    skipped: dict[tuple[str, str, str], int] = defaultdict(int)
    for r in rows:
        if r["status"] == "skipped":
            skipped[(r["op"], r["impl"], r["reason"])] += 1
        elif lines:
            print(check_line(r))
    for (op, impl, reason), n in skipped.items():
        print(f"  {'skip':<7} {op:<22} {impl:<10} ({n} problems) {reason}")
    if not rows:
        print("  nothing to check")


BENCH_HEADER = (f"  {'op':<20} {'problem':<40} {'impl':<28} {'median':>10} {'TFLOP/s':>8} {'GB/s':>8} "
                f"{'roof%':>6} {'speedup':>8} {'peak MiB':>9}  check")

#: One line under the header that says what every column means.
BENCH_LEGEND = (
    "  columns: median per call (CUDA events; on a CPU wall clock, `interp` rows through the Triton interpreter) | "
    "TFLOP/s, GB/s: counted FLOPs and fewest bytes over the median | roof%: share of the roofline, the slower of "
    "FLOPs at the measured matmul rate and bytes at the measured copy bandwidth | speedup: the `base` row's "
    "time (the first of the op's baselines that ran, in the order `list` shows) over this row's | peak MiB: GPU "
    "memory the timed calls allocated above their inputs (CUDA only) | check: output vs the reference, ok or FAIL "
    "(blank: the reference itself, or a baseline doing other arithmetic)")


def bench_line(r: dict[str, Any]) -> str | None:
    """One printed line of a benchmark row (None for skipped rows: they are summarised)."""
    if r["status"] == "skipped":
        return None
    impl = r["impl"] + (" interp" if "interpreter" in (r.get("method") or "") else "")
    head = f"  {r['op']:<20} {r['problem'][:40]:<40} {impl[:28]:<28}"
    if r["status"] != "ok":
        return f"{head} ERROR {r['reason']}"
    chk = r.get("check") or {}
    check = {True: "ok", False: "FAIL", None: ""}[chk.get("ok")]
    if chk.get("ok") is False:
        check += f" ({check_text(chk)})"
    roof = None if r.get("frac_roofline") is None else 100 * r["frac_roofline"]
    db = r.get("do_bench") or {}
    if db.get("agree") is False:
        check += f" [do_bench {db['ms']:.4g} ms: {db['ratio']:.2f}x the events' median]"
    if r.get("gpu_busy"):
        check += " [GPU busy]"
    speedup = "base" if r.get("baseline") == r["impl"] else _opt(r.get("speedup"), ".2f")
    peak = (r.get("memory") or {}).get("above_start_mib")
    graph = r.get("graph") or {}
    replay = (f"  graph {_fmt_ms(graph['median_ms'])}" if "median_ms" in graph
              else f"  graph: {graph['reason'][:60]}" if "reason" in graph else "")
    return (f"{head} {_fmt_ms(r['median_ms']):>10} {_opt(r.get('tflops'), '.3g'):>8} {_opt(r.get('gbps'), '.3g'):>8} "
            f"{_opt(roof, '.0f'):>6} {speedup:>8} {_opt(peak, '.1f'):>9}  {check}{replay}".rstrip())


def print_bench(rows: list[dict[str, Any]], lines: bool = True) -> None:
    """The table of timed rows (``lines=False``: only the skip summary, rows were streamed)."""
    if lines:
        print(BENCH_HEADER)
        print(BENCH_LEGEND)
        print("  " + "-" * (len(BENCH_HEADER) - 2))
        for r in rows:
            line = bench_line(r)
            if line is not None:
                print(line)
    skipped: dict[tuple[str, str, str], int] = defaultdict(int)
    for r in rows:
        if r["status"] == "skipped":
            skipped[(r["op"], r["impl"], r["reason"])] += 1
    if skipped:
        print("  skipped:")
        for (op, impl, reason), n in skipped.items():
            print(f"    {op} / {impl} ({n}): {reason}")


def print_ceilings(ceilings: dict[str, dict[str, Any]]) -> None:
    for name, c in ceilings.items():
        if "value" in c:
            runs = c.get("attempts", [])
            tries = f"; best of {', '.join(f'{v:.4g}' for v in runs)}" if len(runs) > 1 else ""
            print(f"  {name:<22} {c['value']:>10.4g} {c['unit']:<8} ({c['what']}, {_fmt_ms(c['median_ms'])}{tries})")
        else:
            print(f"  {name:<22} skipped: {c['skipped']}")


# ---------------------------------------------------------------------- commands
def cmd_check(parser, args) -> int:
    from .runner import run_check

    device = resolve_device(parser, args.device)
    print(setup_kernels(device))
    plan, sets = _select(parser, args.ops, args.sets, args.impls, ["tiny" if device.type == "cpu" else "check"],
                         device, args.cpu_large)
    print(f"check on {device}, sets {', '.join(sets)}: moela kernels against their references")
    progress = _progress_enabled(args)
    stream = None if progress else (lambda r: r["status"] != "skipped" and print(check_line(r), flush=True))
    rows = run_check(plan, device, impls=args.impls, progress=progress, on_row=stream)
    print_checks(rows, lines=progress)
    bad = [r for r in rows if r["status"] in ("FAIL", "error")]
    print(f"check: {sum(r['status'] == 'pass' for r in rows)} passed, {len(bad)} failed or errored, "
          f"{sum(r['status'] == 'skipped' for r in rows)} skipped")
    return 1 if bad else 0


def _environment():
    from .environment import collect_environment

    return collect_environment()


def _busy_gpu(parser, device, allow: bool) -> list[dict[str, Any]]:
    """Other processes on the GPU make timings noisy (sub-millisecond rows most): refuse, or with
    ``--allow-busy`` warn loudly and record them (every row of the results carries the flag)."""
    if device.type != "cuda":
        return []
    from .environment import nvml_index, other_gpu_processes

    others = other_gpu_processes(nvml_index(device.index or 0))
    if others and not allow:
        parser.error(f"another process holds the GPU ({', '.join(str(p['pid']) for p in others)}): timings would "
                     "be noisy; wait for it, or pass --allow-busy to time anyway (the rows are flagged)")
    if others:
        print(f"WARNING: timing on a busy GPU (processes {', '.join(str(p['pid']) for p in others)}); every row is "
              "flagged gpu_busy", flush=True)
    return others


def _bench(parser, args, device, sets_default, quick_ceilings: bool, interpreter_calls: int | None = None):
    from .ceilings import measure_ceilings
    from .runner import BenchSettings, run_bench

    plan, sets = _select(parser, args.ops, args.sets, args.impls, sets_default, device,
                         getattr(args, "cpu_large", False), getattr(args, "interleave", False))
    busy = _busy_gpu(parser, device, getattr(args, "allow_busy", False))
    ceilings: dict[str, Any] = {}
    rep_ms = getattr(args, "rep_ms", None) or (40.0 if device.type == "cuda" else 100.0)
    if not getattr(args, "no_ceilings", False):
        print(f"ceilings on {device}:")
        ceilings = measure_ceilings(device, quick=quick_ceilings, warmup_ms=getattr(args, "warmup_ms", 10.0),
                                    rep_ms=rep_ms)
        print_ceilings(ceilings)
    settings = BenchSettings(
        device=device, impls=args.impls, warmup_ms=getattr(args, "warmup_ms", 10.0), rep_ms=rep_ms,
        time_budget_s=getattr(args, "time_budget", None), verify=not getattr(args, "no_verify", False),
        progress=_progress_enabled(args), seed=getattr(args, "seed", 0),
        telemetry=not getattr(args, "no_telemetry", False), interpreter_calls=interpreter_calls,
        graphs=getattr(args, "graphs", False), gpu_busy=busy,
    )
    print(f"bench on {device}: {len(plan)} problems, sets {', '.join(sets)}")
    if device.type != "cuda":
        print(CPU_NOTE)
    if not settings.progress:  # a log, not a terminal: every row as soon as it is measured
        print(BENCH_HEADER)
        print(BENCH_LEGEND, flush=True)

        def stream(row: dict[str, Any]) -> None:
            line = bench_line(row)
            if line is not None:
                print(line, flush=True)

        settings.on_row = stream
    previous = signal.signal(signal.SIGTERM, _interrupt) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        rows = run_bench(plan, ceilings, settings)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    settings_out = {"device": str(device), "ops": sorted({op.name for op, _ in plan}), "sets": list(sets),
                    "impls": args.impls, "rep_ms": rep_ms, "warmup_ms": settings.warmup_ms,
                    "time_budget_s": settings.time_budget_s, "seed": settings.seed,
                    "interleave": bool(getattr(args, "interleave", False)), "graphs": settings.graphs}
    by_op = settings.stats.get("seconds_by_op") or {}
    if by_op:
        top = ", ".join(f"{k} {v:.1f}" for k, v in list(by_op.items())[:8])
        print(f"seconds by op (inputs, compiling, tuning, timing, checks): {top}")
    if settings.stats.get("problems_left_out"):
        why = "interrupted" if settings.stats.get("interrupted") else "time budget reached"
        print(f"{why}: {settings.stats['problems_left_out']} problems not run")
    return rows, ceilings, settings_out, settings.stats, settings.progress


def _interrupt(signum, frame):
    """SIGTERM (e.g. from `timeout`) stops the sweep like Ctrl-C: the rows so far are saved."""
    raise KeyboardInterrupt


def _bench_failed(rows: list[dict[str, Any]]) -> bool:
    """Wrong numbers anywhere, or a moela kernel that errored: the run fails (exit 1)."""
    return any((r.get("check") or {}).get("ok") is False or (r["status"] == "error" and r["kind"] == "moela")
               for r in rows)


def _save(args, data: dict[str, Any], kind: str) -> None:
    if args.no_save:
        return
    from .results import default_stem, save_results

    stem = args.name or default_stem(data["environment"], kind)
    json_path, csv_path = save_results(data, args.out, stem)
    print(f"saved {json_path} and {csv_path}\n  report: python -m moela.profiling report {json_path}")


def cmd_bench(parser, args) -> int:
    from .environment import format_environment

    device = resolve_device(parser, args.device)
    env = _environment()
    print(format_environment(env))
    print(setup_kernels(device))
    rows, ceilings, settings, stats, table = _bench(parser, args, device,
                                                   ["tiny" if device.type == "cpu" else "full"], quick_ceilings=False)
    print_bench(rows, lines=table)
    _save(args, {"kind": "bench", "environment": env, "settings": settings, "ceilings": ceilings,
                 "stats": stats, "rows": rows}, "bench")
    return 1 if _bench_failed(rows) else 0


def cmd_report(parser, args) -> int:
    from .report import write_report
    from .results import load_results

    if len(args.results) > 2:
        parser.error(f"report takes one or two result files, got {len(args.results)}")
    for p in args.results:
        try:
            load_results(p)
        except (OSError, ValueError) as e:
            parser.error(f"report: {e}")
    out = args.out or str(Path(args.results[0]).with_suffix("")) + "-report"
    if not args.no_plots and importlib.util.find_spec("matplotlib") is None:
        parser.error("report: the plots need matplotlib (pip install matplotlib), or pass --no-plots")
    md, pngs = write_report(args.results, out, plots=not args.no_plots, ops=args.ops)
    print(f"wrote {md}" + "".join(f"\n      {p}" for p in pngs))
    return 0


def cmd_layers(parser, args) -> int:
    import torch

    from moela.reference import PRESETS

    from .environment import format_environment

    device = resolve_device(parser, args.device)
    for name in args.configs:
        if name not in PRESETS and not Path(name).is_file():
            parser.error(f"--configs: {name!r} is neither a preset ({', '.join(PRESETS)}) nor a config JSON file")
    print(format_environment(_environment()))
    dtype = getattr(torch, args.dtype)
    ok = _print_layers(args.configs, args.tokens, args.decode_steps, device, dtype, args.reps, parser)[0]
    return 0 if ok else 1


def _print_layers(configs, tokens, decode_steps, device, dtype, reps, parser=None):
    from moela.reference import load_config

    from .layers import run_reference_layers

    print(f"\nreference layers on {device}, {str(dtype).removeprefix('torch.')}, median of {reps} (wall clock)\n")
    header = f"  {'config':<18} {'layer':<26} {'shape':<34} {'median ms':>10} {'min ms':>10}  finite"
    print(header)
    print("  " + "-" * (len(header) - 2))
    ok, out = True, []
    for name in configs:
        try:
            args = load_config(name)
        except (OSError, ValueError, TypeError) as e:
            if parser is not None:
                parser.error(f"--configs: {name}: {e}")
            raise
        for r in run_reference_layers(name, args, tokens=tokens, decode_steps=decode_steps, device=device,
                                      dtype=dtype, reps=reps):
            ok &= r.finite
            out.append(vars(r))
            print(f"  {r.config:<18} {r.layer:<26} {r.shape:<34} {r.median_ms:>10.2f} {r.min_ms:>10.2f}  "
                  f"{'yes' if r.finite else 'NO'}", flush=True)
    return ok, out


def cmd_tune(parser, args) -> int:
    from .tune import tune

    device = resolve_device(parser, args.device)
    if device.type != "cuda":
        parser.error("tune: autotuning times configs on a CUDA GPU; this machine has none (the committed "
                     "tables in kernels/configs/ come from GPU runs)")
    print(setup_kernels(device))
    plan, _ = _select(parser, args.ops, args.sets, None, ["full"], device)
    path, n = tune(plan, device, args.budget_s, Path(args.table) if args.table else None)
    print(f"wrote {n} tuned entries to {path}")
    return 0


def cmd_list(parser, args) -> int:
    from moela import knobs

    from .registry import Unavailable, all_ops, warm_groups

    ops = all_ops()
    if args.names:
        print("\n".join(args.ops or ops))
        return 0
    if args.warm_groups:
        print("\n".join(" ".join(g) for g in warm_groups(ops)))
        return 0
    device = resolve_device(parser, args.device)
    print(setup_kernels(device))
    unknown = [n for n in args.ops or [] if n not in ops]
    if unknown:
        parser.error(f"unknown op(s) {', '.join(unknown)}; known ops: {', '.join(ops)}")
    for name in args.ops or ops:
        op = ops[name]
        try:
            op.resolve_kernel()
            kernel = "available"
        except Unavailable as e:
            kernel = str(e)
        except Exception as e:
            kernel = f"ERROR {type(e).__name__}: {e}"
        sets = ", ".join(f"{s} ({len(v)})" for s, v in op.shape_sets.items())
        impls = ", ".join(i.name for i in op.impls())
        where = (f"moela.kernels.{op.kernel}" if isinstance(op.kernel, str)
                 else f"a composite of moela.kernels ops ({op.make_case.__module__} says which)")
        base = ", then ".join(op.baseline_order)
        print(f"{name}: {op.summary}\n  kernel: {where} — {kernel}\n  implementations: {impls}\n"
              f"  speedups over: {base} (the first that ran)\n  sets: {sets}\n")
    if not args.ops:
        print("switches (environment; read at call time):")
        for name, default, where, meaning in knobs.describe():
            print(f"  {name:<26} {('default ' + default) if default else '':<14} [{where}] {meaning}")
    return 0


def cmd_default(parser, args) -> int:
    """Environment, check, ceilings + quick benchmark, reference layers; everything saved."""
    import torch

    from .environment import format_environment
    from .runner import run_check

    t0 = time.perf_counter()
    device = resolve_device(parser, args.device)
    env = _environment()
    print(format_environment(env))
    print(setup_kernels(device))
    cpu = device.type == "cpu"

    print(f"\n== check: moela kernels against their references ({'tiny' if cpu else 'check'} shapes)")
    ops = args.main_ops
    plan, _ = _select(parser, ops, None, None, ["tiny" if cpu else "check"])
    progress = _progress_enabled(args)
    stream = None if progress else (lambda r: r["status"] != "skipped" and print(check_line(r), flush=True))
    checks = run_check(plan, device, progress=progress, on_row=stream)
    print_checks(checks, lines=progress)

    print(f"\n== quick benchmark ({'tiny shapes, moela kernels through the Triton interpreter' if cpu else 'quick'}"
          f"{' shapes' if not cpu else ''})")
    args.ops, args.sets, args.impls = ops, None, None
    # On a CPU the check just ran every interpreted kernel at these shapes: one timed call each.
    rows, ceilings, settings, stats, table = _bench(parser, args, device, ["tiny" if cpu else "quick"],
                                                   quick_ceilings=True, interpreter_calls=1 if cpu else None)
    print_bench(rows, lines=table)

    layers: list[dict[str, Any]] = []
    ok_layers = True
    if not args.no_layers:
        print("\n== reference layers")
        ok_layers, layers = _print_layers(["tiny", "deepseek-v2-lite"], 64, 4, device, torch.float32, 2)

    print()
    _save(args, {"kind": "run", "environment": env, "settings": settings, "ceilings": ceilings, "stats": stats,
                 "rows": rows, "checks": checks, "layers": layers}, "run")
    bad_checks = [r for r in checks if r["status"] in ("FAIL", "error")]
    print(f"done in {time.perf_counter() - t0:.0f} s: {sum(r['status'] == 'pass' for r in checks)} kernel checks "
          f"passed, {len(bad_checks)} failed; {sum(r['status'] == 'ok' for r in rows)} timings")
    return 1 if bad_checks or _bench_failed(rows) or not ok_layers else 0


def cmd_audit(parser, args) -> int:
    """The compile audit (``moela.profiling.audit``): it needs the real kernels, so with
    ``TRITON_INTERPRET`` set it runs in a child process without it."""
    from moela import knobs

    if knobs.interpret():
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, "-m", "moela.profiling.audit", *audit.to_argv(args)],
                              env=env, check=False).returncode
    return audit.run(args)


COMMANDS = {"check": cmd_check, "bench": cmd_bench, "report": cmd_report, "layers": cmd_layers, "list": cmd_list,
            "tune": cmd_tune, "audit": cmd_audit}


def main(argv: Sequence[str] | None = None) -> int:
    if hasattr(sys.stdout, "reconfigure"):  # lines appear as they are printed, in a log or a pipe too
        sys.stdout.reconfigure(line_buffering=True)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        return cmd_default(parser, args)
    return COMMANDS[args.command](parser.subcommands[args.command], args)
