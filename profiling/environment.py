"""What a result was measured on: versions, device, NVML telemetry, git ref, date.

Nothing here touches a GPU at import time; NVML is initialised on demand and a machine
without a driver gets a clean ``{"available": False, "reason": ...}``.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

__all__ = ["collect_environment", "nvml_snapshot", "git_ref", "format_environment"]

_REPO = Path(__file__).resolve().parent.parent


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def git_ref() -> str:
    """``<sha>[-dirty]`` of the checkout moela runs from, or "unknown" outside a git tree."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=_REPO, capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_REPO,
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def nvml_snapshot(index: int = 0) -> dict[str, Any]:
    """GPU name, driver, clocks, power, temperature and memory through NVML (nvidia-ml-py).

    Returns ``{"available": False, "reason": ...}`` where there is no driver or no GPU.
    """
    try:
        import pynvml
    except ImportError as e:  # nvidia-ml-py is a dependency, but be clean anyway
        return {"available": False, "reason": f"nvidia-ml-py not importable: {e}"}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        return {"available": False, "reason": f"no NVML ({e.__class__.__name__}: {e})"}
    try:
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        snap: dict[str, Any] = {
            "available": True,
            "name": _str(pynvml.nvmlDeviceGetName(h)),
            "driver": _str(pynvml.nvmlSystemGetDriverVersion()),
            "sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
            "mem_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM),
            "max_sm_clock_mhz": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM),
            "power_w": pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0,
            "temperature_c": pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU),
            "memory_used_gib": mem.used / 2**30,
            "memory_total_gib": mem.total / 2**30,
        }
        try:
            reasons = pynvml.nvmlDeviceGetCurrentClocksThrottleReasons(h)
            idle = getattr(pynvml, "nvmlClocksThrottleReasonGpuIdle", 0x1)
            snap["throttle_reasons"] = int(reasons)
            snap["throttled"] = bool(reasons & ~idle)
        except pynvml.NVMLError:
            snap["throttled"] = None
        return snap
    except pynvml.NVMLError as e:
        return {"available": False, "reason": f"NVML query failed ({e.__class__.__name__}: {e})"}
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def _str(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def collect_environment() -> dict[str, Any]:
    """Everything a saved result needs to be interpreted later."""
    cuda = torch.cuda.is_available()
    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_ref": git_ref(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "einops": _version("einops"),
        "moela": _version("moela"),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "cuda": torch.version.cuda if cuda else None,
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if cuda else None,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
        "nvml": nvml_snapshot() if cuda else {"available": False, "reason": "no CUDA device"},
    }
    if not cuda:  # a driver can exist without a CUDA torch; report it if so
        nvml = nvml_snapshot()
        if nvml["available"]:
            env["nvml"] = nvml
    return env


def format_environment(env: dict[str, Any]) -> str:
    lines = [
        f"moela {env['moela']} @ {env['git_ref']}   {env['date']}",
        f"python {env['python']}   torch {env['torch']}   triton {env['triton']}   numpy {env['numpy']}",
        f"device: {env['device']}" + (f" (sm_{env['capability'].replace('.', '')}, CUDA {env['cuda']})"
                                      if env["capability"] else f" ({env['cpu_count']} cores)"),
    ]
    nvml = env["nvml"]
    if nvml["available"]:
        lines.append(
            f"NVML: {nvml['name']}, driver {nvml['driver']}, SM {nvml['sm_clock_mhz']}/{nvml['max_sm_clock_mhz']} MHz, "
            f"mem {nvml['mem_clock_mhz']} MHz, {nvml['power_w']:.0f} W, {nvml['temperature_c']} C, "
            f"{nvml['memory_used_gib']:.1f}/{nvml['memory_total_gib']:.1f} GiB"
            + (", THROTTLED" if nvml.get("throttled") else "")
        )
    else:
        lines.append(f"NVML: not available — {nvml['reason']}")
    if not env["capability"]:
        lines.append("note: CPU timings below say nothing about GPU speed")
    return "\n".join(lines)
