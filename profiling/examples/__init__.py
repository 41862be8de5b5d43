"""Small ``triton.testing.perf_report`` scripts over the op registry, one per family: copy one and
edit it (``python -m moela.profiling.examples.perf_report_moe``, or run the file)."""
