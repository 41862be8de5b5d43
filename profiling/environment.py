"""What a result was measured on: versions, device, NVML telemetry, git ref, date.

Nothing here touches a GPU at import time; NVML is initialised on demand and a machine
without a driver gets a clean ``{"available": False, "reason": ...}``.

- :func:`nvml_snapshot`: one reading (name, driver, clocks, power, temperature, memory,
  throttle reasons).
- :class:`Telemetry`: NVML kept open for a run; ``with telemetry.around() as t:`` samples in a
  background thread while a benchmark runs and ``t.summary()`` gives min/max clocks, peak
  power and temperature, memory and whether the clocks were throttled.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import subprocess
import threading
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from moela import knobs

__all__ = [
    "other_gpu_processes", "collect_environment", "nvml_snapshot", "git_ref", "format_environment", "Telemetry",
    "TelemetrySamples", "throttle_reason_names", "nvml_index",
]

_REPO = Path(__file__).resolve().parent.parent


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def git_ref() -> str:
    """``<sha>[-dirty]`` of the checkout moela runs from, or "unknown" outside a git tree.

    ``MOELA_GIT_REF`` overrides it: for a copy of a working tree whose ``.git`` is not the
    tree's (a remote GPU machine that receives a copy of the working tree).
    """
    if knobs.get("MOELA_GIT_REF"):
        return knobs.get("MOELA_GIT_REF")
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=_REPO, capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_REPO,
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


#: NVML clock-event reasons that mean the clocks were held down while working (not idle,
#: not an administrator's clock setting): what the ``throttled`` flag reports.
_THROTTLE = ("SwPowerCap", "HwSlowdown", "SwThermalSlowdown", "HwThermalSlowdown", "HwPowerBrakeSlowdown")
_REASONS = ("GpuIdle", "ApplicationsClocksSetting", "SwPowerCap", "HwSlowdown", "SyncBoost",
            "SwThermalSlowdown", "HwThermalSlowdown", "HwPowerBrakeSlowdown", "DisplayClockSetting")


def _reason_bit(pynvml: Any, name: str) -> int:
    for prefix in ("nvmlClocksThrottleReason", "nvmlClocksEventReason"):
        bit = getattr(pynvml, prefix + name, None)
        if bit is not None:
            return int(bit)
    return 0


def throttle_reason_names(bits: int, pynvml: Any | None = None) -> list[str]:
    """The NVML clock-event reasons set in ``bits`` (e.g. ``["SwPowerCap"]``)."""
    if pynvml is None:
        import pynvml
    return [name for name in _REASONS if bits & _reason_bit(pynvml, name)]


def nvml_index(cuda_index: int = 0) -> int:
    """NVML's index of CUDA device ``cuda_index``: read through CUDA_VISIBLE_DEVICES when it
    lists plain indices (NVML ignores that variable), else the same index."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
    if cuda_index < len(visible) and visible[cuda_index].strip().isdigit():
        return int(visible[cuda_index])
    return cuda_index


def _read(pynvml: Any, h: Any) -> dict[str, Any]:
    """One reading of a handle's clocks, power, temperature, memory and throttle reasons."""
    mem = pynvml.nvmlDeviceGetMemoryInfo(h)
    snap: dict[str, Any] = {
        "sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
        "mem_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM),
        "power_w": pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0,
        "temperature_c": pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU),
        "memory_used_gib": mem.used / 2**30,
        "memory_total_gib": mem.total / 2**30,
    }
    try:
        getter = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
            pynvml.nvmlDeviceGetCurrentClocksThrottleReasons
        reasons = int(getter(h))
        snap["throttle_reasons"] = throttle_reason_names(reasons, pynvml)
        snap["throttled"] = any(reasons & _reason_bit(pynvml, n) for n in _THROTTLE)
    except pynvml.NVMLError:
        snap["throttle_reasons"] = None
        snap["throttled"] = None
    return snap


def _import_nvml() -> tuple[Any, str]:
    try:
        import pynvml
    except ImportError as e:  # nvidia-ml-py is a dependency, but be clean anyway
        return None, f"nvidia-ml-py not importable: {e}"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        return None, f"no NVML ({e.__class__.__name__}: {e})"
    return pynvml, ""


def other_gpu_processes(index: int = 0) -> list[dict[str, Any]]:
    """Processes other than this one holding GPU ``index`` (NVML's compute and graphics lists):
    each ``{"pid", "used_mib"}``. Empty where NVML is unavailable (then nothing is known)."""
    pynvml, _ = _import_nvml()
    if pynvml is None:
        return []
    try:
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        procs = list(pynvml.nvmlDeviceGetComputeRunningProcesses(h))
        procs += list(getattr(pynvml, "nvmlDeviceGetGraphicsRunningProcesses", lambda _h: [])(h))
    except pynvml.NVMLError:
        return []
    mine = os.getpid()
    seen = {}
    for p in procs:
        if p.pid != mine:
            used = getattr(p, "usedGpuMemory", None)
            seen[p.pid] = {"pid": p.pid, "used_mib": None if used is None else round(used / 2**20)}
    return list(seen.values())


def nvml_snapshot(index: int = 0) -> dict[str, Any]:
    """GPU name, driver, clocks, power, temperature and memory through NVML (nvidia-ml-py).

    Returns ``{"available": False, "reason": ...}`` where there is no driver or no GPU.
    """
    pynvml, reason = _import_nvml()
    if pynvml is None:
        return {"available": False, "reason": reason}
    try:
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        return {
            "available": True,
            "name": _str(pynvml.nvmlDeviceGetName(h)),
            "driver": _str(pynvml.nvmlSystemGetDriverVersion()),
            "max_sm_clock_mhz": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM),
            **_read(pynvml, h),
        }
    except pynvml.NVMLError as e:
        return {"available": False, "reason": f"NVML query failed ({e.__class__.__name__}: {e})"}
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


class TelemetrySamples:
    """Readings taken around one benchmark; :meth:`summary` condenses them."""

    def __init__(self) -> None:
        self.samples: list[dict[str, Any]] = []

    def summary(self) -> dict[str, Any] | None:
        """Min/max SM clock, max memory clock, peak power and temperature, peak memory used, and
        whether any reading was throttled (with the reasons seen). None without readings."""
        s = self.samples
        if not s:
            return None
        reasons = sorted({r for x in s for r in (x.get("throttle_reasons") or [])})
        flags = [x.get("throttled") for x in s]
        return {
            "samples": len(s),
            "sm_clock_mhz_min": min(x["sm_clock_mhz"] for x in s),
            "sm_clock_mhz_max": max(x["sm_clock_mhz"] for x in s),
            "mem_clock_mhz": max(x["mem_clock_mhz"] for x in s),
            "power_w_max": max(x["power_w"] for x in s),
            "temperature_c_max": max(x["temperature_c"] for x in s),
            "memory_used_gib_max": max(x["memory_used_gib"] for x in s),
            "throttled": None if all(f is None for f in flags) else any(bool(f) for f in flags),
            "throttle_reasons": reasons,
        }


class Telemetry:
    """NVML held open for a run; sample around each benchmark.

    Without a driver (or NVML) ``available`` is False, ``reason`` says why, and
    :meth:`around` yields an empty :class:`TelemetrySamples` (summary None): callers need no
    special case.

    Example::

        tel = Telemetry(nvml_index(0))
        with tel.around() as samples:
            run_benchmark()
        print(samples.summary())
        tel.close()
    """

    def __init__(self, index: int = 0, interval_s: float = 0.02, enabled: bool = True):
        self.interval_s = interval_s
        self._pynvml, self._handle = None, None
        if not enabled:
            self.reason = "telemetry disabled"
            return
        pynvml, self.reason = _import_nvml()
        if pynvml is None:
            return
        try:
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._pynvml = pynvml
        except pynvml.NVMLError as e:
            self.reason = f"NVML has no device {index} ({e.__class__.__name__}: {e})"
            pynvml.nvmlShutdown()

    @property
    def available(self) -> bool:
        return self._pynvml is not None

    def sample(self) -> dict[str, Any] | None:
        if self._pynvml is None:
            return None
        try:
            return _read(self._pynvml, self._handle)
        except self._pynvml.NVMLError:
            return None

    @contextlib.contextmanager
    def around(self) -> Iterator[TelemetrySamples]:
        """Readings before, every ``interval_s`` during, and after the block."""
        samples = TelemetrySamples()
        if self._pynvml is None:
            yield samples
            return
        stop = threading.Event()

        def take() -> None:
            snap = self.sample()
            if snap is not None:
                samples.samples.append(snap)

        def loop() -> None:
            while not stop.wait(self.interval_s):
                take()

        take()
        thread = threading.Thread(target=loop, name="moela-nvml", daemon=True)
        thread.start()
        try:
            yield samples
        finally:
            stop.set()
            thread.join()
            take()

    def close(self) -> None:
        if self._pynvml is not None:
            with contextlib.suppress(self._pynvml.NVMLError):
                self._pynvml.nvmlShutdown()
            self._pynvml = None


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
        "triton_interpret": knobs.interpret(),
        "nvml": nvml_snapshot(nvml_index(0)) if cuda else {"available": False, "reason": "no CUDA device"},
    }
    if cuda:
        props = torch.cuda.get_device_properties(0)
        env["sm_count"] = props.multi_processor_count
        env["l2_cache_mib"] = getattr(props, "L2_cache_size", 0) / 2**20
        env["gpu_memory_gib"] = props.total_memory / 2**30
    if not cuda:  # a driver can exist without a CUDA torch; report it if so
        nvml = nvml_snapshot()
        if nvml["available"]:
            env["nvml"] = nvml
    return env


def format_environment(env: dict[str, Any]) -> str:
    lines = [
        f"moela {env['moela']} @ {env['git_ref']}   {env['date']}",
        f"python {env['python']}   torch {env['torch']}   triton {env['triton']}   numpy {env['numpy']}",
        f"device: {env['device']}" + (f" (sm_{env['capability'].replace('.', '')}, CUDA {env['cuda']}, "
                                      f"{env.get('sm_count', '?')} SMs, L2 {env.get('l2_cache_mib', 0):.0f} MiB, "
                                      f"{env.get('gpu_memory_gib', 0):.0f} GiB)"
                                      if env["capability"] else f" ({env['cpu_count']} cores)"),
    ]
    nvml = env["nvml"]
    if nvml["available"]:
        lines.append(
            f"NVML: {nvml['name']}, driver {nvml['driver']}, SM {nvml['sm_clock_mhz']}/{nvml['max_sm_clock_mhz']} MHz, "
            f"mem {nvml['mem_clock_mhz']} MHz, {nvml['power_w']:.0f} W, {nvml['temperature_c']} C, "
            f"{nvml['memory_used_gib']:.1f}/{nvml['memory_total_gib']:.1f} GiB"
            + (f", THROTTLED ({', '.join(nvml.get('throttle_reasons') or [])})" if nvml.get("throttled") else "")
        )
    else:
        lines.append(f"NVML: not available — {nvml['reason']}")
    if not env["capability"]:
        lines.append("note: CPU timings below say nothing about GPU speed")
    return "\n".join(lines)
