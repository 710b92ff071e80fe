"""Config section `gpu`."""

from __future__ import annotations

from llmpulse.config.base import Section


class GpuConfig(Section):
    pass
