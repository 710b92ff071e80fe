"""Config section `sdk`: the in-app SDK (`llmpulse.instrument`, `llmpulse.record`).

Usually set from the environment alone: LLMPULSE_KAFKA (kafka://host:port or host:port),
LLMPULSE_APP (this section's `app`), LLMPULSE_SDK__<KEY> for the rest.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from llmpulse.config.base import Section


class SdkConfig(Section):
    app: Annotated[str, Field(min_length=1, max_length=128)] = Field(
        default="default", description="app name put on every call this process records"
    )
    enabled: bool = Field(default=True, description="false: record nothing (instrumented clients still work)")
    provider: Annotated[str, Field(max_length=128)] | None = Field(
        default=None, description="provider name; default: guessed from the client's base URL"
    )
    queue_size: Annotated[int, Field(ge=1, le=10_000_000)] = Field(
        default=10_000, description="events waiting for the background publisher; past it they are dropped"
    )
    enqueue_timeout_s: Annotated[float, Field(ge=0, le=10)] = Field(
        default=0.0, description="the longest a call may wait for room in a full queue (0: drop at once)"
    )
    batch_max: Annotated[int, Field(ge=1, le=100_000)] = Field(
        default=500, description="events per Kafka message at most"
    )
    flush_interval_s: Annotated[float, Field(gt=0, le=60)] = Field(
        default=0.2, description="the longest an event waits in the queue before it is sent"
    )
    exit_flush_timeout_s: Annotated[float, Field(ge=0, le=300)] = Field(
        default=2.0, description="the longest the process waits at exit for queued events to be delivered"
    )
    delivery_timeout_s: Annotated[float, Field(gt=0, le=3600)] = Field(
        default=60.0, description="a message the broker has not acknowledged after this is kept in memory for a retry"
    )
    spool_max_bytes: Annotated[int, Field(ge=0, le=1 << 40)] = Field(
        default=64 << 20, description="undelivered events kept in memory while Kafka is unreachable; past it they are dropped (counted)"
    )
    broker_retry_s: Annotated[float, Field(gt=0, le=3600)] = Field(
        default=5.0, description="how often to look for the broker again when none could be resolved"
    )
