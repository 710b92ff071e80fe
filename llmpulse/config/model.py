"""The root of llmpulse.yaml: one section per component."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from llmpulse.config.actions import ActionsConfig
from llmpulse.config.base import Section
from llmpulse.config.capture import CaptureConfig
from llmpulse.config.clickhouse import ClickHouseConfig
from llmpulse.config.dashboard import DashboardConfig
from llmpulse.config.gpu import GpuConfig
from llmpulse.config.ingest import IngestConfig
from llmpulse.config.kafka import KafkaConfig
from llmpulse.config.llm_metrics import LlmMetricsConfig
from llmpulse.config.notify import NotifyConfig
from llmpulse.config.pricing import PricingConfig
from llmpulse.config.proxy import ProxyConfig
from llmpulse.config.sdk import SdkConfig
from llmpulse.config.sink import SinkConfig
from llmpulse.config.worker import WorkerConfig


class Settings(Section):
    data_dir: Path = Field(default=Path(".llmpulse"), description="embedded broker state, chDB store, spool")
    log_level: str = Field(default="INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")
    rules_file: Path | None = Field(default=None, description="YAML rules; the built-in defaults when unset")
    kafka: KafkaConfig = Field(default_factory=KafkaConfig)
    clickhouse: ClickHouseConfig = Field(default_factory=ClickHouseConfig)
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    sink: SinkConfig = Field(default_factory=SinkConfig)
    proxy: ProxyConfig = Field(default_factory=ProxyConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    gpu: GpuConfig = Field(default_factory=GpuConfig)
    notify: NotifyConfig = Field(default_factory=NotifyConfig)
    dashboard: DashboardConfig = Field(default_factory=DashboardConfig)
    sdk: SdkConfig = Field(default_factory=SdkConfig)
    pricing: PricingConfig = Field(default_factory=PricingConfig)
    capture: CaptureConfig = Field(default_factory=CaptureConfig)
    actions: ActionsConfig = Field(default_factory=ActionsConfig)
    llm_metrics: LlmMetricsConfig = Field(default_factory=LlmMetricsConfig)
