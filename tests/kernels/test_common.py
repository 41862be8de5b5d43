"""kernels._common: config pinning and the one-config rule."""

import pytest
import torch
import triton

from moela.kernels._common import autotune_configs, cdiv, check_kernel_device, next_power_of_2, parse_config

CONFIGS = [triton.Config({"BLOCK_M": 64}, num_warps=4), triton.Config({"BLOCK_M": 128}, num_warps=8)]


def test_one_config_under_the_interpreter_or_when_autotune_is_off(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert autotune_configs("foo", CONFIGS) == CONFIGS[:1]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert autotune_configs("foo", CONFIGS) == CONFIGS
    monkeypatch.setenv("MOELA_AUTOTUNE", "0")
    assert autotune_configs("foo", CONFIGS) == CONFIGS[:1]


def test_env_pins_one_config(monkeypatch):
    monkeypatch.setenv("MOELA_FOO_CONFIG", "BLOCK_M=32, BLOCK_N=16,num_warps=2,num_stages=3")
    (cfg,) = autotune_configs("foo", CONFIGS)
    assert cfg.kwargs == {"BLOCK_M": 32, "BLOCK_N": 16} and cfg.num_warps == 2 and cfg.num_stages == 3
    monkeypatch.setenv("MOELA_FOO_CONFIG", "BLOCK_M=big")
    with pytest.raises(ValueError, match="MOELA_FOO_CONFIG"):
        autotune_configs("foo", CONFIGS)
    with pytest.raises(ValueError, match="no block sizes"):
        parse_config("num_warps=4")


def test_small_math_and_device_check(monkeypatch):
    assert [cdiv(a, 4) for a in (0, 1, 4, 5)] == [0, 1, 1, 2]
    assert [next_power_of_2(n) for n in (0, 1, 2, 3, 64, 65)] == [1, 1, 2, 4, 64, 128]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="x: expected a CUDA tensor"):
        check_kernel_device("x", torch.zeros(1))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    check_kernel_device("x", torch.zeros(1))
