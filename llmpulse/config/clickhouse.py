"""Where events are kept: embedded chDB in the data directory, or a ClickHouse server."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator

from llmpulse.config.base import Section

Days = Annotated[int, Field(ge=1, le=36500)]


class RetentionConfig(Section):
    llm_calls: Days = 30
    llm_calls_1m: Days = 35
    llm_calls_1h: Days = 400
    gpu_samples: Days = 30
    host_samples: Days = 30
    llm_aggregates: Days = 400
    alerts: Days = 400
    feedback: Days = 400
    deadletter: Days = 30
    actions: Days = 400


class ClickHouseConfig(Section):
    url: str = Field(
        default="embedded",
        description="'embedded' (chDB under data_dir) or http(s)://user:password@host:port",
    )
    database: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] = "llmpulse"
    retention_days: RetentionConfig = Field(default_factory=RetentionConfig)
    cluster: str | None = Field(
        default=None, description="emit ON CLUSTER DDL with Replicated engines for this cluster"
    )
    query_max_rows: Annotated[int, Field(ge=1)] = 10_000
    query_max_seconds: Annotated[float, Field(gt=0)] = 10.0
    # what one read-only query (llmpulse query, /api/query, the panels) may cost; past a
    # limit it stops with the reason (llmpulse/analysis/readonly.py)
    query_max_rows_to_read: Annotated[int, Field(ge=1)] = Field(
        default=200_000_000, description="rows one query may read from the tables"
    )
    query_max_bytes_to_read: Annotated[int, Field(ge=1)] = Field(
        default=20 * 2**30, description="bytes (uncompressed) one query may read"
    )
    query_max_memory_bytes: Annotated[int, Field(ge=1)] = Field(
        default=2 * 2**30, description="memory one query may use"
    )

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: str) -> str:
        if v == "embedded" or v.startswith(("http://", "https://")):
            return v
        raise ValueError("expected 'embedded' or http(s)://host:port")

    @property
    def embedded(self) -> bool:
        return self.url == "embedded"
