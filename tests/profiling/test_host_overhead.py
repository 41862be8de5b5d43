"""python -m moela.profiling.host_overhead: the host time of an MoE decode step, kernels left out."""

import pytest

from moela.kernels.interpreter import interpreter_active
from moela.profiling import host_overhead


@pytest.mark.slow
@pytest.mark.skipif(not interpreter_active(), reason="runs the layer through the Triton interpreter (CPU runs)")
def test_measures_and_restores_the_interpreter(capsys):
    import triton.runtime.interpreter as interp

    run = interp.InterpretedFunction.run
    assert host_overhead.main(["--calls", "3", "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    assert "us of host time per call (min of 2 x 3 calls, after 3 warm-up calls)" in out
    assert float(out.split("kernels left out: ")[1].split(" us")[0]) > 0
    assert "baseline: moela.reference.MoE" in out and "floor: torch.empty" in out
    assert interp.InterpretedFunction.run is run  # kernels run again afterwards
    assert host_overhead.main(["--calls", "2", "--rounds", "1", "--ops"]) == 0
    lines = capsys.readouterr().out.splitlines()[3:]
    assert [line.split()[0] for line in lines] == ["route", "make_routing", "permute", "grouped_gemm", "swiglu",
                                                   "unpermute"]
    assert all(line.endswith("us per call") for line in lines)
    assert host_overhead.main(["--calls", "2", "--rounds", "1", "--ops", "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("moela.model.MoE forward, bfloat16, T=1") and "grouped_gemm" in out


def test_bad_arguments_exit_2():
    with pytest.raises(SystemExit) as e:
        host_overhead.main(["--rounds", "0"])
    assert e.value.code == 2
