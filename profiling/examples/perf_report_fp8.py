"""perf_report sweep of the block-scaled FP8 GEMM (``fp8_gemm``) on DeepGEMM's dense grid.

    python -m moela.profiling.examples.perf_report_fp8 [--save DIR]

GPU: DeepGEMM's m × (n, k) grid, TFLOP/s from ``triton.testing.do_bench``, moela against cuBLAS
block-wise FP8, per-tensor FP8 and bf16 (and DeepGEMM where it is installed). CPU: the ``tiny``
set through the Triton interpreter (wall clock: it shows the sweep runs, nothing about GPU speed).
Edit OP, GPU_SET, IMPLS and METRIC; ``python -m moela.profiling list --ops OP`` shows the choices.
"""

from moela.profiling.perf_reports import benchmark, device_and_set, main, measure

OP = "fp8_gemm"
GPU_SET = "deepgemm-dense"  # the set on a GPU; a CPU runs "tiny"
IMPLS = None  # every implementation: moela, the reference and the baselines
METRIC = "TFLOP/s"  # "ms", "TFLOP/s" or "GB/s"


def sweep():
    device, shape_set = device_and_set(GPU_SET)  # no GPU: the Triton interpreter, turned on before triton is imported
    import triton.testing

    @triton.testing.perf_report(benchmark(OP, shape_set, IMPLS, METRIC, device))
    def fp8_gemm(problem, impl):
        return measure(OP, shape_set, problem, impl, device, METRIC)

    return fp8_gemm


if __name__ == "__main__":
    raise SystemExit(main(sweep))
