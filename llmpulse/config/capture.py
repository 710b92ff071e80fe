"""Config section `capture`."""

from __future__ import annotations

from llmpulse.config.base import Section


class CaptureConfig(Section):
    pass
