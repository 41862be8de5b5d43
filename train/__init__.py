"""moela.train: a small end-to-end trainer of a DeepSeek-style LM built from moela's layers.

``python -m moela.train [--preset tiny]`` trains the same model three ways (PyTorch references,
Triton bf16, Triton FP8 as DeepSeek-V3 trains) on the Python standard library's source bytes and
plots the loss curves and per-expert loads; ``--distill-from`` trains a smaller student on a
saved model's logits. Files: ``cli`` (the command), ``loop`` (one run), ``data`` (the corpus),
``presets`` (model sizes), ``optim`` (float32 master weights), ``metrics`` (FLOPs, MFU),
``plots`` (PNGs).
"""

__all__: list[str] = []
