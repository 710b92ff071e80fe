"""Config section `sdk`."""

from __future__ import annotations

from llmpulse.config.base import Section


class SdkConfig(Section):
    pass
