"""HostSample: one reading of one host's CPU, memory and load, taken beside its GPUs."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from llmpulse.schemas.base import (
    IdStr,
    NonNegFloat,
    NonNegInt,
    Percent,
    ShortStr,
    UtcDatetime,
    WireModel,
    new_event_id,
    utc_now,
)


class HostSample(WireModel):
    """Units as psutil reports them: percentages 0-100, bytes, load averages as run-queue lengths."""

    event_id: IdStr = Field(default_factory=new_event_id)
    ts: UtcDatetime = Field(default_factory=utc_now)
    host: ShortStr
    cpu_count: Annotated[int, Field(ge=1, le=65536)] | None = None
    cpu_pct: Percent = Field(description="CPU busy share of all cores since the previous reading")
    memory_used_bytes: NonNegInt
    memory_total_bytes: NonNegInt
    memory_used_pct: Percent
    load1: NonNegFloat | None = Field(default=None, description="1-minute load average (None where the OS has none)")
    load5: NonNegFloat | None = None
    load15: NonNegFloat | None = None
