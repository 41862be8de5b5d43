"""profiling.tune: what the autotuners tuned becomes table entries; the command needs a GPU."""

import pytest
import triton

from moela.kernels import config_tables
from moela.profiling.cli import main
from moela.profiling.tune import tuned_entries


class _FakeTuner:
    moela_name = "fake_kernel"
    keys = ["N", "M_BUCKET"]

    def __init__(self, cache, sources):
        self.cache, self._sources = cache, sources

    def source_of(self, config):
        return self._sources[id(config)]


def test_tuned_entries_become_a_table_the_lookup_reads(tmp_path):
    a = triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=3)
    b = triton.Config({"BLOCK_M": 128}, num_warps=4, num_stages=4)
    tabled = triton.Config({"BLOCK_M": 16}, num_warps=2, num_stages=2)
    tuner = _FakeTuner({(4096, 16, "torch.bfloat16"): a, (4096, 8192, "torch.bfloat16"): b,
                        (512, 16, "torch.bfloat16"): tabled},
                       {id(a): "tuned", id(b): "tuned", id(tabled): "table"})
    entries = tuned_entries([tuner])
    assert len(entries) == 2  # what came from a table is not written back as measured
    path = config_tables.write_table(tmp_path / "x.json", entries, {"device": "X"})
    table = config_tables._load(str(path))
    assert sum(len(v) for v in table.values()) == 2
    got = config_tables.lookup("fake_kernel", {"N": 4096, "M_BUCKET": 4096}, ("torch.bfloat16",), "x",
                               directory=tmp_path)
    assert got.kwargs == {"BLOCK_M": 128} and got.num_stages == 4
    # merging: a re-tuned key replaces its entry, others stay
    c = triton.Config({"BLOCK_M": 256}, num_warps=8, num_stages=3)
    config_tables.write_table(path, [config_tables.entry("fake_kernel", {"N": 4096, "M_BUCKET": 8192},
                                                         ["torch.bfloat16"], c)], {"device": "X"})
    assert config_tables.lookup("fake_kernel", {"N": 4096, "M_BUCKET": 8192}, ("torch.bfloat16",), "x",
                                directory=tmp_path).kwargs == {"BLOCK_M": 256}
    assert config_tables.lookup("fake_kernel", {"N": 4096, "M_BUCKET": 16}, ("torch.bfloat16",), "x",
                                directory=tmp_path).kwargs == {"BLOCK_M": 64}


def test_bad_table_files_are_named(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json: not a moela config table"):
        config_tables._load(str(bad))
    old = tmp_path / "old.json"
    old.write_text('{"format": 0, "entries": []}')
    with pytest.raises(ValueError, match="format 0"):
        config_tables._load(str(old))


def test_tune_refuses_without_a_gpu(capsys):
    with pytest.raises(SystemExit):
        main(["tune", "--device", "cpu"])
    assert "tune: autotuning times configs on a CUDA GPU" in capsys.readouterr().err
