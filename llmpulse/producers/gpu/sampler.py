"""Read every GPU every interval and publish one GpuSample per GPU to `<prefix>gpu`, keyed by host;
beside them, one HostSample (CPU, memory, load) of the same host to `<prefix>host`, same key.

A failing host reading never costs the GPU samples of the round, nor the other way round."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from llmpulse.config import Settings
from llmpulse.producers.gpu.host import HostReader, read_host_sample
from llmpulse.producers.gpu.nvml import NVML_TEMPERATURE_GPU, Nvml, NvmlCallError, SimulatedNvml
from llmpulse.schemas import GpuProcess, GpuSample, HostSample

log = logging.getLogger(__name__)


def _maybe(fn: Callable[..., Any], *args: Any) -> Any:
    """The value of one optional NVML reading, or None where the device does not support it."""
    try:
        return fn(*args)
    except NvmlCallError as exc:
        log.debug("NVML reading unavailable: %s", exc)
        return None


def _processes(nvml: Nvml, handle: Any) -> list[GpuProcess]:
    procs = _maybe(nvml.nvmlDeviceGetComputeRunningProcesses, handle) or []
    out = []
    for p in procs[:256]:
        name = _maybe(nvml.nvmlSystemGetProcessName, p.pid) or ""
        used = p.usedGpuMemory
        out.append(
            GpuProcess(
                pid=max(0, int(p.pid)),
                name=name[:256],
                used_memory_bytes=used if used is not None and used >= 0 else None,
            )
        )
    return out


def read_samples(
    nvml: Nvml, host: str, processes: bool = True, ts: datetime | None = None
) -> list[GpuSample]:
    """One GpuSample per GPU, read now. Utilisation and memory are required; the rest optional."""
    when = ts or datetime.now(UTC)
    samples = []
    for index in range(nvml.nvmlDeviceGetCount()):
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            util = nvml.nvmlDeviceGetUtilizationRates(handle)
            mem = nvml.nvmlDeviceGetMemoryInfo(handle)
        except NvmlCallError as exc:
            log.warning("GPU %d: cannot read utilisation/memory: %s", index, exc)
            continue
        power_mw = _maybe(nvml.nvmlDeviceGetPowerUsage, handle)
        limit_mw = _maybe(nvml.nvmlDeviceGetEnforcedPowerLimit, handle)
        temp = _maybe(nvml.nvmlDeviceGetTemperature, handle, NVML_TEMPERATURE_GPU)
        samples.append(
            GpuSample(
                ts=when,
                host=host[:128],
                gpu_index=index,
                gpu_uuid=(_maybe(nvml.nvmlDeviceGetUUID, handle) or "")[:128],
                name=(_maybe(nvml.nvmlDeviceGetName, handle) or "")[:128],
                utilization_gpu_pct=float(min(100, max(0, util.gpu))),
                utilization_memory_pct=float(min(100, max(0, util.memory))),
                memory_used_bytes=max(0, mem.used),
                memory_total_bytes=max(0, mem.total),
                temperature_c=None if temp is None else float(max(0, temp)),
                power_draw_w=None if power_mw is None else power_mw / 1000.0,
                power_limit_w=None if limit_mw is None else limit_mw / 1000.0,
                processes=_processes(nvml, handle) if processes else [],
            )
        )
    return samples


def simulated_from_settings(settings: Settings) -> SimulatedNvml:
    g = settings.gpu
    return SimulatedNvml(gpus=g.simulate_gpus, base_util_pct=g.simulate_base_util_pct)


class GpuSampler:
    """Samples `nvml` every `interval_s` and hands each GpuSample to `publish(topic, sample, key)`;
    with a `host_reader`, also one HostSample per round to `publish(host_topic, sample, key)`.

    `publish` is normally `EventPublisher.publish` (never blocks, never raises); `start()`
    runs the loop in a daemon thread, `run()` in the caller's. `nvml=None` samples the host only.
    """

    def __init__(
        self,
        nvml: Nvml | None,
        publish: Callable[[str, Any, str], object],
        topic: str,
        host: str | None = None,
        interval_s: float = 5.0,
        processes: bool = True,
        on_samples: Callable[[list[GpuSample]], None] | None = None,
        host_reader: HostReader | None = None,
        host_topic: str | None = None,
    ) -> None:
        if host_reader is not None and not host_topic:
            raise ValueError("a host reader needs the host topic")
        self.nvml = nvml
        self.publish = publish
        self.topic = topic
        self.host = host or socket.gethostname()
        self.interval_s = interval_s
        self.processes = processes
        self.on_samples = on_samples
        self.host_reader = host_reader
        self.host_topic = host_topic or ""
        self.samples_published = 0
        self.host_samples_published = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        nvml: Nvml | None,
        publish: Callable[[str, Any, str], object],
        host_reader: HostReader | None = None,
    ) -> GpuSampler:
        """`host_reader`: None reads this machine through psutil when `gpu.host_resources` is on."""
        g = settings.gpu
        if host_reader is None and g.host_resources:
            from llmpulse.producers.gpu.host import PsutilHost

            host_reader = PsutilHost()
        return cls(
            nvml,
            publish,
            settings.kafka.topic("gpu"),
            host=g.host,
            interval_s=g.interval_s,
            processes=g.processes,
            host_reader=host_reader,
            host_topic=settings.kafka.topic("host"),
        )

    def sample_once(self) -> list[GpuSample]:
        samples: list[GpuSample] = []
        try:
            if self.nvml is not None:
                samples = read_samples(self.nvml, self.host, self.processes)
                for s in samples:
                    self.publish(self.topic, s, self.host)
                self.samples_published += len(samples)
                if self.on_samples is not None:
                    self.on_samples(samples)
        finally:
            self.sample_host()
        return samples

    def sample_host(self) -> HostSample | None:
        """Read and publish this round's HostSample; None (logged) when there is no reader or it failed."""
        if self.host_reader is None:
            return None
        try:
            sample = read_host_sample(self.host_reader, self.host)
        except Exception as exc:
            log.warning("host reading failed: %s", exc)
            return None
        self.publish(self.host_topic, sample, self.host)
        self.host_samples_published += 1
        return sample

    def run(self, stop: threading.Event | None = None, max_rounds: int | None = None) -> None:
        """Sample until `stop` is set (or `max_rounds` readings), on a fixed-rate schedule."""
        stop = stop or self._stop
        next_at = time.monotonic()
        rounds = 0
        while not stop.is_set():
            try:
                self.sample_once()
            except Exception as exc:
                log.warning("GPU sampling failed: %s", exc)  # the host sample of the round went out
            rounds += 1
            if max_rounds is not None and rounds >= max_rounds:
                return
            next_at += self.interval_s
            delay = next_at - time.monotonic()
            if delay < 0:  # fell behind (suspended machine): re-anchor instead of bursting
                next_at = time.monotonic()
                delay = 0
            stop.wait(delay)

    def start(self) -> GpuSampler:
        if self.nvml is not None:
            self.nvml.nvmlInit()
        self._thread = threading.Thread(target=self.run, name="llmpulse-gpu-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self.nvml is not None:
            with contextlib.suppress(NvmlCallError):
                self.nvml.nvmlShutdown()
