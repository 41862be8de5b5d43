"""perf_report sweep of the MoE expert GEMM (``grouped_gemm``): moela against torch's grouped GEMM.

    python -m moela.profiling.examples.perf_report_moe [--save DIR]

GPU: DeepSeek-V3 decode shapes, TFLOP/s from ``triton.testing.do_bench``. CPU: the ``tiny`` set
through the Triton interpreter (wall clock: it shows the sweep runs, nothing about GPU speed).
Edit OP, GPU_SET, IMPLS and METRIC; ``python -m moela.profiling list --ops OP`` shows the choices.
"""

from moela.profiling.perf_reports import benchmark, device_and_set, main, measure

OP = "grouped_gemm"
GPU_SET = "v3-decode"  # the set on a GPU; a CPU runs "tiny"
IMPLS = ["moela", "torch grouped_mm", "torch loop"]
METRIC = "TFLOP/s"  # "ms", "TFLOP/s" or "GB/s"


def sweep():
    device, shape_set = device_and_set(GPU_SET)  # no GPU: the Triton interpreter, turned on before triton is imported
    import triton.testing

    @triton.testing.perf_report(benchmark(OP, shape_set, IMPLS, METRIC, device))
    def grouped_gemm(problem, impl):
        return measure(OP, shape_set, problem, impl, device, METRIC)

    return grouped_gemm


if __name__ == "__main__":
    raise SystemExit(main(sweep))
