"""GPU sampler: simulated device -> real broker; the no-driver path of `llmpulse gpu`."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable

from llmpulse.config import Settings
from llmpulse.kafka.clients import producer_settings
from llmpulse.producers.gpu import GpuSampler, PinnedWindow, SimulatedNvml, read_samples
from llmpulse.producers.publisher import EventPublisher
from llmpulse.schemas import GpuSample, decode
from tests.kafkatools import read_messages

GIB = 1024**3


def test_simulated_samples_reach_gpu_topic_with_all_fields(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(**{"gpu.interval_s": 0.1, "gpu.host": "gpu-host-1"})
    bootstrap = settings.kafka.bootstrap_servers()
    now = time.time()
    nvml = SimulatedNvml(gpus=2, base_util_pct=30, pinned=[PinnedWindow(1, now - 1, now + 600, 97)])
    publisher = EventPublisher(producer_settings(bootstrap, settings.kafka))
    sampler = GpuSampler.from_settings(settings, nvml, publisher.publish).start()
    try:
        msgs = read_messages(bootstrap, settings.kafka.topic("gpu"), expect=6, timeout=60)
    finally:
        sampler.stop()
        publisher.flush(10)
    assert len(msgs) >= 6
    samples = []
    for m in msgs:
        assert m.key() == b"gpu-host-1"
        decoded = decode(m.value(), GpuSample)
        assert not decoded.rejected
        samples.extend(decoded.valid)
    assert {s.gpu_index for s in samples} == {0, 1}
    for s in samples:
        assert s.host == "gpu-host-1"
        assert s.gpu_uuid.startswith("GPU-") and "simulated" in s.name
        assert s.memory_total_bytes == 80 * GIB and 0 < s.memory_used_bytes < s.memory_total_bytes
        assert 0 < s.utilization_memory_pct <= 100
        assert s.temperature_c is not None and 30 < s.temperature_c < 100
        assert s.power_limit_w == 700.0 and s.power_draw_w is not None and 0 < s.power_draw_w <= 700
        assert s.processes and s.processes[0].used_memory_bytes == 20 * GIB and s.processes[0].name
        if s.gpu_index == 1:  # pinned by the incident window
            assert 95 <= s.utilization_gpu_pct <= 99
        else:
            assert s.utilization_gpu_pct < 60


class _NoPowerNoProcs(SimulatedNvml):
    """A device whose driver refuses power and process queries (as consumer cards and containers do)."""

    def nvmlDeviceGetPowerUsage(self, handle: object) -> int:
        from llmpulse.producers.gpu import NvmlCallError

        raise NvmlCallError("nvmlDeviceGetPowerUsage: Not Supported")

    def nvmlDeviceGetComputeRunningProcesses(self, handle: object) -> list[object]:  # type: ignore[override]
        from llmpulse.producers.gpu import NvmlCallError

        raise NvmlCallError("nvmlDeviceGetComputeRunningProcesses: No Permission")


def test_unsupported_readings_become_empty_not_errors() -> None:
    nvml = _NoPowerNoProcs(gpus=1)
    nvml.nvmlInit()
    (s,) = read_samples(nvml, "h")
    assert s.power_draw_w is None and s.processes == []
    assert s.power_limit_w == 700.0 and s.temperature_c is not None


def test_no_driver_prints_one_line_and_exits_nonzero(tmp_path: object) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMPULSE_")}
    env["LD_LIBRARY_PATH"] = ""
    proc = subprocess.run(
        [sys.executable, "-m", "llmpulse", "gpu"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=str(tmp_path),
    )
    assert proc.returncode != 0
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "no NVIDIA driver" in lines[0]
