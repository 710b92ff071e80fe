"""GPU sampler: NVML (or a simulated device) read every interval, published as GpuSample events;
the host's CPU, memory and load beside them as HostSample events."""

from llmpulse.producers.gpu.host import HostReader, PsutilHost, read_host_sample
from llmpulse.producers.gpu.nvml import (
    Nvml,
    NvmlCallError,
    NvmlUnavailable,
    PinnedWindow,
    RealNvml,
    SimulatedNvml,
    load_nvml,
)
from llmpulse.producers.gpu.sampler import GpuSampler, read_samples, simulated_from_settings

__all__ = [
    "GpuSampler",
    "HostReader",
    "Nvml",
    "NvmlCallError",
    "NvmlUnavailable",
    "PinnedWindow",
    "PsutilHost",
    "RealNvml",
    "SimulatedNvml",
    "load_nvml",
    "read_host_sample",
    "read_samples",
    "simulated_from_settings",
]
