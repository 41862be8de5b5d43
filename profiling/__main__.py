"""``python -m moela.profiling``: environment, then the reference layers of some configs, timed."""

from __future__ import annotations

import argparse
import sys

import torch

from moela.profiling.environment import collect_environment, format_environment
from moela.profiling.layers import run_reference_layers
from moela.reference import PRESETS, load_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m moela.profiling", description=__doc__)
    p.add_argument("--configs", nargs="+", default=["tiny", "deepseek-v2-lite"],
                   help=f"preset names ({', '.join(PRESETS)}) or DeepSeek config JSON paths")
    p.add_argument("--tokens", type=int, default=64, help="tokens through the MoE; prefill length of MLA")
    p.add_argument("--decode-steps", type=int, default=4)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--reps", type=int, default=3)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available()
                          else "cpu" if a.device == "auto" else a.device)
    print(format_environment(collect_environment()), flush=True)
    print(f"\nreference layers on {device}, {a.dtype}, median of {a.reps} (wall clock)\n")
    header = f"{'config':<18} {'layer':<26} {'shape':<34} {'median ms':>10} {'min ms':>10}  finite"
    print(header)
    print("-" * len(header))
    ok = True
    for name in a.configs:
        args = load_config(name)
        for r in run_reference_layers(name, args, tokens=a.tokens, decode_steps=a.decode_steps,
                                      device=device, dtype=DTYPES[a.dtype], reps=a.reps):
            ok &= r.finite
            print(f"{r.config:<18} {r.layer:<26} {r.shape:<34} {r.median_ms:>10.2f} {r.min_ms:>10.2f}  "
                  f"{'yes' if r.finite else 'NO'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
