"""One module per op; each registers itself with ``moela.profiling.registry.register``.

Every module here whose name does not start with ``_`` is imported by
``moela.profiling.registry.all_ops()``, so adding an op is adding one file::

    # profiling/ops/foo.py
    from moela import reference as ref
    from ..registry import Case, Impl, Op, register
    from ..shapes import Problem
    from ._common import close, generator, randn

    OP = "foo"

    def make_case(p: Problem, device, seed) -> Case:
        x = randn((p.params["tokens"], p.params["d"]), torch.bfloat16, device, generator(device, seed))
        return Case(p, {"x": x}, flops=..., bytes=...)   # counted from the shapes

    register(Op(
        name=OP, summary="...", make_case=make_case,
        signature=lambda c: ((c.inputs["x"],), {}),        # args of the reference and the kernel
        reference=ref.foo, kernel="foo",                    # moela.kernels.foo, looked up lazily
        shape_sets={"tiny": [...], "check": [...], "quick": [...], "v3-decode": [...]},
        compare=close(1e-5),
        baselines=(Impl("torch native", lambda c: (lambda: ...)),),
        baseline_order=("torch native", "reference"),
    ))

Shapes come from ``moela.profiling.shapes`` (DeepSeek dims, token sweeps, DeepGEMM grids).
"""
