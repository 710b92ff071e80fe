"""GPU sampler: NVML (or a simulated device) read every interval, published as GpuSample events."""

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
    "Nvml",
    "NvmlCallError",
    "NvmlUnavailable",
    "PinnedWindow",
    "RealNvml",
    "SimulatedNvml",
    "load_nvml",
    "read_samples",
    "simulated_from_settings",
]
