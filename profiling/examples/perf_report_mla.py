"""perf_report sweep of MLA decode attention (``mla_decode``) on FlashMLA's shapes, in GB/s.

    python -m moela.profiling.examples.perf_report_mla [--save DIR]

GPU: FlashMLA's decode shapes (batch 128, caches of 4096/8192, 16-128 heads), GB/s of the cache
read from ``triton.testing.do_bench``, moela against torch SDPA (and FlashMLA where it is
installed). CPU: the ``tiny`` set through the Triton interpreter (wall clock: it shows the sweep
runs, nothing about GPU speed). Edit OP, GPU_SET, IMPLS and METRIC.
"""

from moela.profiling.perf_reports import benchmark, device_and_set, main, measure

OP = "mla_decode"
GPU_SET = "flashmla-decode"  # the set on a GPU; a CPU runs "tiny"
IMPLS = ["moela", "torch sdpa", "torch math"]
METRIC = "GB/s"  # "ms", "TFLOP/s" or "GB/s"


def sweep():
    device, shape_set = device_and_set(GPU_SET)  # no GPU: the Triton interpreter, turned on before triton is imported
    import triton.testing

    @triton.testing.perf_report(benchmark(OP, shape_set, IMPLS, METRIC, device))
    def mla_decode(problem, impl):
        return measure(OP, shape_set, problem, impl, device, METRIC)

    return mla_decode


if __name__ == "__main__":
    raise SystemExit(main(sweep))
