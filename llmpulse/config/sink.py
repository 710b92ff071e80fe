"""The ClickHouse sink: INSERT batches, separate from processing batches."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from llmpulse.config.base import Section


class SinkConfig(Section):
    """Each table has its own INSERT buffer: written when it holds `batch_rows` rows or its
    oldest row is `batch_seconds` old (about one INSERT per second per table under load).
    `poll_messages` is the processing batch (messages decoded per poll), a separate thing.
    When all buffers together hold `max_buffered_rows`, fetching stops until they are written."""

    batch_rows: Annotated[int, Field(ge=1)] = 50_000
    batch_seconds: Annotated[float, Field(gt=0)] = 1.0
    max_buffered_rows: Annotated[int, Field(ge=1)] = 500_000
    poll_messages: Annotated[int, Field(ge=1, le=1_000_000)] = 10_000
    instance_id: str | None = Field(
        default=None,
        description="Kafka static group membership (group.instance.id): a restarted sink with the same id "
        "gets its partitions back without waiting for the old session to time out",
    )
    retry_initial_s: Annotated[float, Field(gt=0)] = 0.5
    retry_max_s: Annotated[float, Field(gt=0)] = 30.0
    web_host: str = Field(default="127.0.0.1", description="address of /metrics with a ClickHouse server (0.0.0.0 in containers)")
    web_port: Annotated[int, Field(ge=0, le=65535)] = Field(
        default=0, description="serve /metrics on this port with a ClickHouse server (embedded: on the query endpoint)"
    )
    query_host: str = "127.0.0.1"
    query_port: Annotated[int, Field(ge=0, le=65535)] = 0
