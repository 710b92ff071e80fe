"""NVML behind an interface: the real driver (pynvml) or a simulated device with the same calls.

`Nvml` names exactly the pynvml functions the sampler calls, with their pynvml
signatures and units (memory in bytes, power in milliwatts, temperature in °C), so
the sampler reads a simulated device through the same call pattern as a real one.
"""

from __future__ import annotations

import math
import random
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

NVML_TEMPERATURE_GPU = 0


class NvmlUnavailable(Exception):
    """No usable NVIDIA driver / NVML library on this machine."""


class NvmlCallError(Exception):
    """One NVML call failed (not supported on this device, no permission, ...)."""


@dataclass(frozen=True, slots=True)
class Utilization:
    gpu: int
    memory: int


@dataclass(frozen=True, slots=True)
class MemoryInfo:
    total: int
    used: int
    free: int


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    pid: int
    usedGpuMemory: int | None


class Nvml(Protocol):
    """The pynvml calls the GPU sampler makes."""

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlDeviceGetCount(self) -> int: ...
    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any: ...
    def nvmlDeviceGetUUID(self, handle: Any) -> str: ...
    def nvmlDeviceGetName(self, handle: Any) -> str: ...
    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Utilization: ...
    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> MemoryInfo: ...
    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int: ...
    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int: ...
    def nvmlDeviceGetEnforcedPowerLimit(self, handle: Any) -> int: ...
    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> Sequence[ProcessInfo]: ...
    def nvmlSystemGetProcessName(self, pid: int) -> str: ...


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class RealNvml:
    """NVML through pynvml (the nvidia-ml-py module); every failure becomes an NvmlCallError."""

    def __init__(self) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the `pynvml` shim warns about its own name
                import pynvml
        except ImportError as exc:
            raise NvmlUnavailable(
                "pynvml is not installed (pip install 'llmpulse[all]' or nvidia-ml-py)"
            ) from exc
        self._m: Any = pynvml

    def _call(self, name: str, *args: Any) -> Any:
        try:
            return getattr(self._m, name)(*args)
        except self._m.NVMLError as exc:
            raise NvmlCallError(f"{name}: {exc}") from None

    def nvmlInit(self) -> None:
        try:
            self._m.nvmlInit()
        except self._m.NVMLError as exc:
            raise NvmlUnavailable(f"NVML cannot start: {exc}") from None

    def nvmlShutdown(self) -> None:
        self._call("nvmlShutdown")

    def nvmlDeviceGetCount(self) -> int:
        return int(self._call("nvmlDeviceGetCount"))

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
        return self._call("nvmlDeviceGetHandleByIndex", index)

    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        return _text(self._call("nvmlDeviceGetUUID", handle))

    def nvmlDeviceGetName(self, handle: Any) -> str:
        return _text(self._call("nvmlDeviceGetName", handle))

    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Utilization:
        u = self._call("nvmlDeviceGetUtilizationRates", handle)
        return Utilization(gpu=int(u.gpu), memory=int(u.memory))

    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> MemoryInfo:
        m = self._call("nvmlDeviceGetMemoryInfo", handle)
        return MemoryInfo(total=int(m.total), used=int(m.used), free=int(m.free))

    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int:
        return int(self._call("nvmlDeviceGetTemperature", handle, sensor))

    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int:
        return int(self._call("nvmlDeviceGetPowerUsage", handle))

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: Any) -> int:
        return int(self._call("nvmlDeviceGetEnforcedPowerLimit", handle))

    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> Sequence[ProcessInfo]:
        out = []
        for p in self._call("nvmlDeviceGetComputeRunningProcesses", handle):
            used = getattr(p, "usedGpuMemory", None)
            out.append(ProcessInfo(pid=int(p.pid), usedGpuMemory=None if used is None else int(used)))
        return out

    def nvmlSystemGetProcessName(self, pid: int) -> str:
        return _text(self._call("nvmlSystemGetProcessName", pid))


@dataclass(frozen=True, slots=True)
class PinnedWindow:
    """GPU `gpu_index` held at `util_pct` between two wall-clock times (epoch seconds)."""

    gpu_index: int
    start: float
    end: float
    util_pct: float = 98.0


@dataclass
class _SimDevice:
    index: int
    uuid: str
    name: str
    memory_total: int
    power_limit_mw: int
    phase: float


@dataclass
class SimulatedNvml:
    """A simulated NVIDIA device answering the same calls as pynvml.

    Utilisation follows a slow wave around `base_util_pct` with some noise; inside a
    `PinnedWindow` its GPU reads `util_pct` (±1). Memory, temperature and power follow
    the utilisation the way a real card's do. `pinned` may be changed while it runs.
    """

    gpus: int = 2
    base_util_pct: float = 35.0
    pinned: list[PinnedWindow] = field(default_factory=list)
    name: str = "NVIDIA H100 80GB HBM3 (simulated)"
    memory_total_bytes: int = 80 * 1024**3
    power_limit_w: float = 700.0
    seed: int = 7
    clock: Callable[[], float] = time.time
    _devices: list[_SimDevice] = field(default_factory=list, init=False)
    _rng: random.Random = field(init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _started: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._devices = [
            _SimDevice(
                index=i,
                uuid=f"GPU-{self.seed:08x}-sim0-{i:04x}-0000-{i:012x}",
                name=self.name,
                memory_total=self.memory_total_bytes,
                power_limit_mw=int(self.power_limit_w * 1000),
                phase=i * 1.7,
            )
            for i in range(self.gpus)
        ]

    def pin(self, window: PinnedWindow) -> None:
        with self._lock:
            self.pinned.append(window)

    def utilization_at(self, index: int, now: float) -> float:
        with self._lock:
            windows = list(self.pinned)
        for w in windows:
            if w.gpu_index == index and w.start <= now < w.end:
                return max(0.0, min(100.0, w.util_pct + self._rng.uniform(-1, 1)))
        dev = self._devices[index]
        wave = 12.0 * math.sin(now / 60.0 + dev.phase)
        return max(0.0, min(100.0, self.base_util_pct + wave + self._rng.uniform(-5, 5)))

    def _dev(self, handle: Any) -> _SimDevice:
        if not self._started:
            raise NvmlCallError("NVML not initialised (call nvmlInit first)")
        if not isinstance(handle, _SimDevice):
            raise NvmlCallError("invalid device handle")
        return handle

    def nvmlInit(self) -> None:
        self._started = True

    def nvmlShutdown(self) -> None:
        self._started = False

    def nvmlDeviceGetCount(self) -> int:
        if not self._started:
            raise NvmlCallError("NVML not initialised (call nvmlInit first)")
        return len(self._devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
        if not self._started:
            raise NvmlCallError("NVML not initialised (call nvmlInit first)")
        if not 0 <= index < len(self._devices):
            raise NvmlCallError(f"invalid GPU index {index}")
        return self._devices[index]

    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        return self._dev(handle).uuid

    def nvmlDeviceGetName(self, handle: Any) -> str:
        return self._dev(handle).name

    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Utilization:
        dev = self._dev(handle)
        gpu = self.utilization_at(dev.index, self.clock())
        return Utilization(gpu=round(gpu), memory=round(gpu * 0.6))

    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> MemoryInfo:
        dev = self._dev(handle)
        gpu = self.utilization_at(dev.index, self.clock())
        used = int(dev.memory_total * min(0.95, 0.25 + gpu / 150.0))
        return MemoryInfo(total=dev.memory_total, used=used, free=dev.memory_total - used)

    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int:
        dev = self._dev(handle)
        return round(34 + 0.5 * self.utilization_at(dev.index, self.clock()))

    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int:
        dev = self._dev(handle)
        frac = 0.1 + 0.85 * self.utilization_at(dev.index, self.clock()) / 100.0
        return int(dev.power_limit_mw * frac)

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: Any) -> int:
        return self._dev(handle).power_limit_mw

    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> Sequence[ProcessInfo]:
        dev = self._dev(handle)
        return [ProcessInfo(pid=4000 + dev.index, usedGpuMemory=dev.memory_total // 4)]

    def nvmlSystemGetProcessName(self, pid: int) -> str:
        return "python3 -m vllm.entrypoints.openai.api_server (simulated)"


def load_nvml() -> RealNvml:
    """The real NVML, initialised; NvmlUnavailable (one clear line) without a driver."""
    nvml = RealNvml()
    nvml.nvmlInit()
    return nvml
