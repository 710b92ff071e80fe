"""GpuSample: one reading of one GPU through NVML."""

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


class GpuProcess(WireModel):
    pid: NonNegInt
    name: Annotated[str, Field(max_length=256)] = ""
    used_memory_bytes: NonNegInt | None = None


class GpuSample(WireModel):
    event_id: IdStr = Field(default_factory=new_event_id)
    ts: UtcDatetime = Field(default_factory=utc_now)
    host: ShortStr
    gpu_index: NonNegInt
    gpu_uuid: ShortStr = ""
    name: ShortStr = ""
    utilization_gpu_pct: Percent
    utilization_memory_pct: Percent = 0.0
    memory_used_bytes: NonNegInt = 0
    memory_total_bytes: NonNegInt = 0
    temperature_c: NonNegFloat | None = None
    power_draw_w: NonNegFloat | None = None
    power_limit_w: NonNegFloat | None = None
    processes: Annotated[list[GpuProcess], Field(max_length=256)] = Field(default_factory=list)
