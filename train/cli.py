"""``python -m moela.train``: train a tiny DeepSeek-style LM three ways and compare.

Runs (``--runs``, default all three): ``reference`` (moela.reference's PyTorch ops), ``triton-bf16``
(moela's Triton kernels) and ``triton-fp8`` (the kernels with ``train_fp8``: every projection and
expert GEMM of forward and backward in e4m3). All start from the same weights and see the same
batches; the summary gives each run's final held-out loss, the largest relative gap between them,
tokens/s and (on a GPU) MFU. Written to ``--out``: ``loss.png``, ``expert_load.png``,
``results.json`` (and with ``--save`` each run's checkpoint: ``config.json`` + ``model.safetensors``).

``--distill-from DIR`` trains a smaller student (``presets.student_args``: half the layers and
experts) on a saved teacher's logits (KL divergence), as DeepSeek distilled R1 into small models.

Without a GPU the Triton runs go through the Triton interpreter (``TRITON_INTERPRET=1`` is set
before the kernels are imported); keep to ``--preset tiny`` there.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from .cpu import use_interpreter

__all__ = ["build_parser", "run", "main"]

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def build_parser() -> argparse.ArgumentParser:
    from .loop import RUNS
    from .presets import PRESETS

    p = argparse.ArgumentParser(prog="python -m moela.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="model and run size (default: small on a GPU, tiny on a CPU)")
    p.add_argument("--runs", default=",".join(r.name for r in RUNS),
                   help=f"comma-separated runs among {', '.join(r.name for r in RUNS)}")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the preset's)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=None, help="bytes per sequence")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16", help="parameter and activation dtype")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--seed", type=int, default=0, help="initial weights and batch order")
    p.add_argument("--out", default="moela-train", help="folder for the plots, results.json and checkpoints")
    p.add_argument("--save", action="store_true", help="save each run's final model under OUT/<run>/")
    p.add_argument("--distill-from", default=None, metavar="CHECKPOINT",
                   help="a saved run (folder with config.json and model.safetensors): train a smaller student on "
                        "its logits")
    p.add_argument("--max-gap", type=float, default=0.02,
                   help="the relative gap between the runs' final held-out losses the summary checks (default 2 %%)")
    p.add_argument("--check", action="store_true", help="exit with status 1 when the gap exceeds --max-gap")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def load_teacher(path: Path, device: torch.device, dtype: torch.dtype):
    from moela.model import Transformer, load_checkpoint
    from moela.reference import ModelArgs

    args = ModelArgs.from_json(path / "config.json", backend="auto", train_fp8=False)
    teacher = Transformer(args).to(device=device, dtype=dtype)
    load_checkpoint(teacher, path / "model.safetensors")
    return teacher.eval().requires_grad_(False)


def _save(model, args, folder: Path) -> None:
    from moela.model import save_checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(args.replace(backend="auto", train_fp8=False).to_dict(), indent=1))
    save_checkpoint(model, folder / "model.safetensors")


def run(argv: list[str] | None = None) -> dict:
    """Parse ``argv``, train, plot, write results.json; returns the results (also printed)."""
    from .loop import RUNS

    opts = build_parser().parse_args(argv)
    by_name = {r.name: r for r in RUNS}
    names = [n.strip() for n in opts.runs.split(",") if n.strip()]
    unknown = [n for n in names if n not in by_name]
    if unknown or not names:
        raise SystemExit(f"--runs: unknown run(s) {unknown}; expected names among {sorted(by_name)}")
    specs = [by_name[n] for n in names]
    if any(s.backend == "triton" for s in specs):
        use_interpreter()  # without CUDA: the Triton interpreter, with its large tiles

    from .data import ByteBatches, stdlib_corpus
    from .loop import build_model, evaluate, train_run
    from .plots import plot_expert_load, plot_losses
    from .presets import PRESETS, student_args

    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _DTYPES[opts.dtype]
    preset = PRESETS[opts.preset or ("small" if device.type == "cuda" else "tiny")]
    overrides = {k: v for k, v in (("batch", opts.batch), ("seq_len", opts.seq_len), ("lr", opts.lr)) if v is not None}
    preset = replace(preset, **overrides)
    steps = opts.steps if opts.steps is not None else preset.steps
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)

    teacher = None
    args = preset.args.replace(max_seq_len=max(preset.args.max_seq_len, preset.seq_len),
                               original_seq_len=max(preset.args.original_seq_len, preset.seq_len))
    if opts.distill_from:
        teacher = load_teacher(Path(opts.distill_from), device, dtype)
        args = student_args(teacher.args)
    batches = ByteBatches(stdlib_corpus(preset.corpus_bytes), preset.batch, preset.seq_len, seed=opts.seed,
                          n_eval=preset.n_eval, device=device)
    torch.manual_seed(opts.seed)
    init_state = build_model(args.replace(backend="reference"), device, dtype).state_dict()

    results, teacher_eval = [], None
    if teacher is not None:
        teacher_eval = evaluate(teacher, batches.eval_batches())
    started = time.perf_counter()
    for spec in specs:
        result, model = train_run(spec, preset, args, init_state, batches, device, dtype, steps, teacher=teacher,
                                  progress=not opts.no_progress)
        results.append(result)
        if opts.save:
            _save(model, args, out / spec.name)
        del model
    finals = [r.final_eval for r in results]
    gap = (max(finals) - min(finals)) / min(finals)
    what = "student distilled from " + str(opts.distill_from) if teacher is not None else "byte-level LM"
    name = opts.preset or preset_name(preset)
    title = f"moela.train {name}: {what}, {steps} steps × {preset.batch}×{preset.seq_len} bytes, {device.type}"
    plots = [str(plot_losses(results, out / "loss.png", title)),
             str(plot_expert_load(results, out / "expert_load.png", "per-expert load (aux-loss-free bias balancing)"))]
    summary = {
        "preset": name, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": opts.dtype, "steps": steps, "batch": preset.batch, "seq_len": preset.seq_len,
        "model": args.to_dict(), "distill_from": opts.distill_from, "teacher_eval": teacher_eval,
        "final_eval": {r.name: r.final_eval for r in results}, "max_gap": gap, "within_max_gap": gap <= opts.max_gap,
        "check": opts.check,
        "seconds_total": time.perf_counter() - started, "plots": plots,
        "runs": [asdict(r) for r in results],
    }
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    _print_summary(summary, results, opts.max_gap)
    return summary


def preset_name(preset) -> str:
    from .presets import PRESETS

    return next((k for k, v in PRESETS.items() if v.args == preset.args), "custom")


def _print_summary(summary: dict, results, max_gap: float) -> None:
    print(f"\nmoela.train  preset={summary['preset']}  device={summary['device_name']}  steps={summary['steps']}  "
          f"params={results[0].params / 1e6:.2f} M ({results[0].active_params / 1e6:.2f} M active)")
    if summary["teacher_eval"] is not None:
        print(f"teacher held-out loss {summary['teacher_eval']:.4f}")
    print(f"{'run':>12}  {'final held-out':>14}  {'last train':>10}  {'tokens/s':>10}  {'MFU':>6}  {'time':>7}")
    for r in results:
        mfu = "n/a" if r.mfu is None else f"{100 * r.mfu:.1f}%"
        print(f"{r.name:>12}  {r.final_eval:>14.4f}  {r.losses[-1]:>10.4f}  {r.tokens_per_s:>10.0f}  {mfu:>6}  "
              f"{r.seconds:>6.1f}s")
    ok = "within" if summary["within_max_gap"] else "NOT within"
    print(f"largest gap between final held-out losses: {100 * summary['max_gap']:.2f} % ({ok} {100 * max_gap:g} %)")
    print("plots: " + ", ".join(summary["plots"]))


def main(argv: list[str] | None = None) -> int:
    """The command: 1 when ``--check`` is given and the runs' final losses are further apart than ``--max-gap``."""
    summary = run(argv)
    return 1 if summary["check"] and not summary["within_max_gap"] else 0
