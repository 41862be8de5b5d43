"""NVML telemetry: a clean "not available" without a driver, and readings decoded from NVML."""

from __future__ import annotations

import sys
import types

import pytest

from moela.profiling import environment as envmod
from moela.profiling.environment import Telemetry, collect_environment, format_environment, nvml_index


class _NVMLError(Exception):
    pass


class _LibraryNotFound(_NVMLError):
    pass


def fake_pynvml(throttle_bits: int = 0, init_error: type[Exception] | None = None) -> types.ModuleType:
    """Just enough of pynvml for the telemetry: one H200-like device."""
    m = types.ModuleType("pynvml")
    m.NVMLError = _NVMLError
    m.NVML_CLOCK_SM, m.NVML_CLOCK_MEM, m.NVML_TEMPERATURE_GPU = 0, 1, 0
    m.nvmlClocksThrottleReasonGpuIdle = 0x1
    m.nvmlClocksThrottleReasonSwPowerCap = 0x4
    m.nvmlClocksThrottleReasonHwSlowdown = 0x8
    m.calls = {"init": 0, "shutdown": 0}

    def init():
        m.calls["init"] += 1
        if init_error is not None:
            raise init_error("NVML Shared Library Not Found")

    def shutdown():
        m.calls["shutdown"] += 1

    m.nvmlInit, m.nvmlShutdown = init, shutdown
    m.nvmlDeviceGetHandleByIndex = lambda i: f"gpu{i}"
    m.nvmlDeviceGetName = lambda h: b"NVIDIA H200"
    m.nvmlSystemGetDriverVersion = lambda: "580.159.04"
    m.nvmlDeviceGetClockInfo = lambda h, which: 1980 if which == 0 else 3201
    m.nvmlDeviceGetMaxClockInfo = lambda h, which: 1980
    m.nvmlDeviceGetPowerUsage = lambda h: 650_000
    m.nvmlDeviceGetTemperature = lambda h, which: 61
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=8 << 30, total=141 << 30)
    m.nvmlDeviceGetCurrentClocksThrottleReasons = lambda h: throttle_bits
    return m


def test_no_driver_is_clean(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(init_error=_LibraryNotFound))
    snap = envmod.nvml_snapshot()
    assert snap == {"available": False, "reason": snap["reason"]} and "no NVML" in snap["reason"]
    tel = Telemetry()
    assert not tel.available and "no NVML" in tel.reason
    with tel.around() as samples:
        pass
    assert samples.summary() is None
    tel.close()


def test_no_nvidia_ml_py(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    assert "not importable" in envmod.nvml_snapshot()["reason"]
    assert not Telemetry().available


def test_snapshot_and_samples_with_a_driver(monkeypatch):
    fake = fake_pynvml(throttle_bits=0x1 | 0x4)  # idle + software power cap
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    snap = envmod.nvml_snapshot()
    assert snap["available"] and snap["name"] == "NVIDIA H200" and snap["sm_clock_mhz"] == 1980
    assert snap["power_w"] == 650.0 and snap["throttled"] is True
    assert snap["throttle_reasons"] == ["GpuIdle", "SwPowerCap"]
    assert fake.calls["init"] == fake.calls["shutdown"] == 1

    tel = Telemetry(interval_s=0.001)
    with tel.around() as samples:
        pass
    s = samples.summary()
    assert s["samples"] >= 2 and s["sm_clock_mhz_min"] == 1980 and s["power_w_max"] == 650.0
    assert s["throttled"] is True and s["throttle_reasons"] == ["GpuIdle", "SwPowerCap"]
    tel.close()
    assert fake.calls["shutdown"] == 2


def test_idle_is_not_throttling(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(throttle_bits=0x1))
    assert envmod.nvml_snapshot()["throttled"] is False


def test_disabled_telemetry_touches_nothing(monkeypatch):
    fake = fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    tel = Telemetry(enabled=False)
    assert not tel.available and fake.calls["init"] == 0


@pytest.mark.parametrize(("visible", "index", "expected"), [("", 0, 0), ("3,1", 0, 3), ("3,1", 1, 1),
                                                           ("GPU-1234", 0, 0)])
def test_nvml_index_follows_cuda_visible_devices(monkeypatch, visible, index, expected):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert nvml_index(index) == expected


def test_environment_on_this_machine():
    env = collect_environment()
    for key in ("date", "git_ref", "torch", "triton", "device", "nvml"):
        assert key in env
    text = format_environment(env)
    assert "torch" in text and "NVML" in text


def test_git_ref_override(monkeypatch):
    from moela.profiling.environment import git_ref

    monkeypatch.delenv("MOELA_GIT_REF", raising=False)
    own = git_ref()  # the checkout's sha, or "unknown" outside a git tree
    monkeypatch.setenv("MOELA_GIT_REF", "abc123def456")
    assert git_ref() == "abc123def456" != own
    monkeypatch.setenv("MOELA_GIT_REF", " ")  # blank: the checkout's own ref again
    assert git_ref() == own
