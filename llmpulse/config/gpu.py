"""Config section `gpu`: the NVML sampler (and the host readings beside it), and the simulated device
used by tests and the demo."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from llmpulse.config.base import Section

Pct = Annotated[float, Field(ge=0, le=100)]


class GpuConfig(Section):
    interval_s: Annotated[float, Field(gt=0, le=3600)] = Field(
        default=5.0, description="seconds between two readings of every GPU"
    )
    host: Annotated[str, Field(max_length=128)] | None = Field(
        default=None, description="host name put on samples (and the message key); default: this machine's"
    )
    processes: bool = Field(default=True, description="read the processes using each GPU where the driver allows")
    host_resources: bool = Field(
        default=True, description="also publish the host's CPU, memory and load (psutil) to <prefix>host every interval"
    )
    simulate: bool = Field(default=False, description="read a simulated device instead of NVML")
    simulate_gpus: Annotated[int, Field(ge=1, le=64)] = 2
    simulate_base_util_pct: Pct = Field(default=35.0, description="simulated mean utilisation outside incidents")
    simulate_pinned_util_pct: Pct = Field(default=98.0, description="simulated utilisation of a pinned GPU")
