"""Host readings (CPU, memory, load) behind an interface: psutil, or a stand-in with the same calls.

`HostReader` names exactly the psutil functions the sampler calls, with psutil's
signatures and units, so a test's stand-in is read through the same call pattern as
the real host (as `Nvml` does for the GPUs). A reading that fails never stops the GPU
samples of the same round: the sampler logs it and publishes what it could read.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any, Protocol

from llmpulse.schemas.host import HostSample

log = logging.getLogger(__name__)


class HostReader(Protocol):
    """The psutil calls the host sampler makes."""

    def cpu_percent(self, interval: float | None = None) -> float: ...
    def cpu_count(self) -> int | None: ...
    def virtual_memory(self) -> Any: ...  # .total, .available (bytes), .percent
    def getloadavg(self) -> tuple[float, float, float]: ...


class PsutilHost:
    """This machine, through psutil.

    `cpu_percent(None)` compares with the previous call: the first reading after start
    is primed here, so the first sample covers the time since the sampler started."""

    def __init__(self) -> None:
        import psutil

        self._p: Any = psutil
        self._p.cpu_percent(None)

    def cpu_percent(self, interval: float | None = None) -> float:
        return float(self._p.cpu_percent(interval))

    def cpu_count(self) -> int | None:
        n = self._p.cpu_count()
        return None if n is None else int(n)

    def virtual_memory(self) -> Any:
        return self._p.virtual_memory()

    def getloadavg(self) -> tuple[float, float, float]:
        a, b, c = self._p.getloadavg()
        return float(a), float(b), float(c)


def _pct(v: float) -> float:
    return float(min(100.0, max(0.0, v)))


def read_host_sample(reader: HostReader, host: str, ts: datetime | None = None) -> HostSample:
    """One HostSample read now. CPU and memory are required; load averages are optional (None
    where the OS has none). Memory used is total minus available, the figure psutil's
    `percent` is computed from, so used / total is the percentage."""
    cpu = reader.cpu_percent(None)
    mem = reader.virtual_memory()
    total = max(0, int(mem.total))
    used = min(total, max(0, total - int(mem.available)))
    try:
        load: tuple[float, float, float] | None = reader.getloadavg()
    except (OSError, AttributeError) as exc:
        log.debug("load average unavailable: %s", exc)
        load = None
    try:
        cores = reader.cpu_count()
    except (OSError, NotImplementedError):
        cores = None
    return HostSample(
        ts=ts or datetime.now(UTC),
        host=host[:128],
        cpu_count=cores if cores and cores > 0 else None,
        cpu_pct=_pct(cpu),
        memory_used_bytes=used,
        memory_total_bytes=total,
        memory_used_pct=_pct(100.0 * used / total) if total else _pct(float(mem.percent)),
        load1=None if load is None else max(0.0, load[0]),
        load5=None if load is None else max(0.0, load[1]),
        load15=None if load is None else max(0.0, load[2]),
    )
