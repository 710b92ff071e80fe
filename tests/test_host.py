"""Host resources beside the GPUs: psutil-shaped readings -> HostSample -> `host` topic -> worker
windows and the default memory rule -> ClickHouse (`host_samples`, `llm_aggregates`, `alerts`).

The host's readings come from a stand-in with psutil's calls and units (as the GPU tests read a
simulated NVML): the sampler, publisher, broker, worker, sink and store are the real ones.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from llmpulse.config import Settings
from llmpulse.kafka.clients import producer_settings
from llmpulse.producers.gpu import GpuSampler, PsutilHost, SimulatedNvml, read_host_sample
from llmpulse.producers.publisher import EventPublisher
from llmpulse.schemas import GpuSample, HostSample, decode
from tests.kafkatools import read_messages
from tests.pipeline import Component, settings_from, wait_for, write_config
from tests.test_dashboard_api import Dash

GIB = 1024**3


@dataclass
class VirtualMemory:
    """The fields of psutil's `svmem` the sampler reads."""

    total: int
    available: int
    percent: float


class StandInHost:
    """A host answering psutil's calls with set readings; `fail_memory` makes virtual_memory() raise."""

    def __init__(self, cpu: float = 40.0, total: int = 64 * GIB, used_pct: float = 93.0,
                 load: tuple[float, float, float] | None = (2.5, 2.0, 1.5), cores: int | None = 16) -> None:  # fmt: skip
        self.cpu = cpu
        self.total = total
        self.used_pct = used_pct
        self.load = load
        self.cores = cores
        self.fail_memory = False
        self.calls: list[str] = []

    def cpu_percent(self, interval: float | None = None) -> float:
        assert interval is None  # never blocks the sampler's loop
        self.calls.append("cpu_percent")
        return self.cpu

    def cpu_count(self) -> int | None:
        return self.cores

    def virtual_memory(self) -> VirtualMemory:
        if self.fail_memory:
            raise OSError("cannot read /proc/meminfo")
        available = int(self.total * (1 - self.used_pct / 100))
        return VirtualMemory(total=self.total, available=available, percent=self.used_pct)

    def getloadavg(self) -> tuple[float, float, float]:
        if self.load is None:
            raise OSError("no load average on this OS")
        return self.load


def test_reading_units_and_missing_load() -> None:
    s = read_host_sample(StandInHost(), "h1")
    assert s.host == "h1" and s.cpu_pct == 40.0 and s.cpu_count == 16
    assert s.memory_total_bytes == 64 * GIB
    assert s.memory_used_bytes == 64 * GIB - int(64 * GIB * 0.07)  # total minus available
    assert s.memory_used_pct == pytest.approx(93.0, abs=1e-6)
    assert (s.load1, s.load5, s.load15) == (2.5, 2.0, 1.5)
    # an OS without load averages (Windows) and a machine whose core count is unknown
    bare = read_host_sample(StandInHost(load=None, cores=None, cpu=130.0), "h2")
    assert bare.load1 is None and bare.load15 is None and bare.cpu_count is None
    assert bare.cpu_pct == 100.0  # clamped to the schema's range


def test_psutil_reads_this_machine() -> None:
    s = read_host_sample(PsutilHost(), "here")
    vm = psutil.virtual_memory()
    assert s.memory_total_bytes == vm.total and 0 < s.memory_used_bytes < vm.total
    assert 0 <= s.cpu_pct <= 100 and s.load1 is not None and s.cpu_count == psutil.cpu_count()


def test_a_failing_host_reading_does_not_cost_the_gpu_samples(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(**{"gpu.host": "mixed-host"})
    got: list[tuple[str, object, str]] = []
    host = StandInHost()
    nvml = SimulatedNvml(gpus=2)
    nvml.nvmlInit()
    sampler = GpuSampler.from_settings(settings, nvml, lambda t, s, k: got.append((t, s, k)), host_reader=host)
    assert sampler.host_topic == settings.kafka.topic("host")
    sampler.sample_once()
    assert [type(s) for _, s, _ in got] == [GpuSample, GpuSample, HostSample]
    assert {t for t, _, _ in got} == {settings.kafka.topic("gpu"), settings.kafka.topic("host")}
    assert {k for _, _, k in got} == {"mixed-host"}
    got.clear()
    host.fail_memory = True
    sampler.sample_once()
    assert [type(s) for _, s, _ in got] == [GpuSample, GpuSample]
    assert sampler.host_samples_published == 1 and sampler.samples_published == 4


def test_host_resources_off() -> None:
    from llmpulse.config import load_settings

    settings = load_settings(None, environ={}, overrides={"gpu.host_resources": False})
    sampler = GpuSampler.from_settings(settings, None, lambda *_: None)
    assert sampler.host_reader is None and sampler.sample_once() == []


def test_cli_host_only_prints_this_hosts_samples(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMPULSE_")}
    proc = subprocess.run(
        [sys.executable, "-m", "llmpulse", "gpu", "--host-only", "--dry-run", "--rounds", "2", "--interval", "0.1"],
        capture_output=True, text=True, timeout=60, env=env, cwd=str(tmp_path),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2
    samples = [HostSample.model_validate_json(line) for line in lines]
    assert samples[0].memory_total_bytes == psutil.virtual_memory().total and samples[0].load1 is not None
    assert "and the host's CPU, memory and load" in proc.stderr and "GpuSample" not in proc.stdout
    both = subprocess.run([sys.executable, "-m", "llmpulse", "gpu", "--host-only", "--no-host"],
                          capture_output=True, text=True, timeout=60, env=env, cwd=str(tmp_path))  # fmt: skip
    assert both.returncode != 0 and "exclude each other" in both.stderr


@pytest.mark.e2e
def test_host_samples_reach_clickhouse_with_windows_and_the_memory_rule(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    config = write_config(tmp_path / "llmpulse.yaml", make_settings(), dashboard__port=0)
    settings = settings_from(config)
    bootstrap = settings.kafka.bootstrap_servers()
    sink = Component(config, "sink", log=tmp_path / "sink.log").start()
    worker = Component(config, "worker", log=tmp_path / "worker.log").start()
    publisher = EventPublisher(producer_settings(bootstrap, settings.kafka))
    hosts = {"model-host-1": StandInHost(cpu=35.0, used_pct=93.0), "model-host-2": StandInHost(cpu=12.0, used_pct=41.0)}
    samplers = [
        GpuSampler(None, publisher.publish, settings.kafka.topic("gpu"), host=name, interval_s=0.1,
                   host_reader=reader, host_topic=settings.kafka.topic("host"))
        for name, reader in hosts.items()
    ]  # fmt: skip
    try:
        stop = threading.Event()
        threads = [threading.Thread(target=s.run, args=(stop, 40)) for s in samplers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert publisher.flush(30) == 0
        n = sum(s.host_samples_published for s in samplers)
        assert n == 80
        msgs = read_messages(bootstrap, settings.kafka.topic("host"), expect=n, timeout=60)
        assert {m.key() for m in msgs} == {b"model-host-1", b"model-host-2"}
        assert all(not decode(m.value(), HostSample).rejected for m in msgs)

        rows = wait_for(
            settings,
            "SELECT host, count(), avg(memory_used_pct), avg(cpu_pct), any(memory_total_bytes), avg(load1) "
            "FROM llmpulse.host_samples FINAL GROUP BY host ORDER BY host",
            lambda r: sum(x[1] for x in r) >= n,
        )
        assert [(r[0], r[1]) for r in rows] == [("model-host-1", 40), ("model-host-2", 40)]
        assert rows[0][2] == pytest.approx(93.0, abs=0.01) and rows[1][2] == pytest.approx(41.0, abs=0.01)
        assert rows[0][3] == pytest.approx(35.0) and rows[0][4] == 64 * GIB and rows[0][5] == pytest.approx(2.5)

        # the worker's host windows: every sample counted once, averages as read
        aggs = wait_for(
            settings,
            "SELECT dimensions['host'], sum(samples), max(host_memory_max_pct), min(host_cpu_avg_pct) "
            "FROM llmpulse.llm_aggregates FINAL WHERE kind = 'host' AND window_s = 2 GROUP BY 1 ORDER BY 1",
            lambda r: sum(x[1] for x in r) >= n,
        )
        assert [(a[0], a[1]) for a in aggs] == [("model-host-1", 40), ("model-host-2", 40)]
        assert aggs[0][2] == pytest.approx(93.0, abs=0.01) and aggs[1][3] == pytest.approx(12.0)

        # the built-in rule: memory above 90% on the first host only
        alerts = wait_for(
            settings,
            "SELECT dimensions['host'], severity, state, metric FROM llmpulse.alerts FINAL WHERE rule = 'host_memory'",
            lambda r: len(r) > 0,
        )
        assert alerts and {a[0] for a in alerts} == {"model-host-1"}
        assert ("warning", "firing", "host_memory_avg_pct") in [tuple(a[1:]) for a in alerts]

        # the dashboard's host panel
        dash = Dash(settings)
        try:
            code, panel, _ = dash.get("/api/host?from=now-15m")
        finally:
            dash.close()
        assert code == 200 and [x["name"] for x in panel["series"]] == ["model-host-1", "model-host-2"]
        first = panel["series"][0]
        assert max(first["memory_used_pct"]) == pytest.approx(93.0, abs=0.01)
        assert first["cpu_pct"][0] == pytest.approx(35.0) and first["load1"][0] == pytest.approx(2.5)
    finally:
        worker.stop()
        sink.stop()
    for c in (worker, sink):
        assert "Traceback" not in c.output(), c.output()[-3000:]
