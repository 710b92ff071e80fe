"""Config section `notify`."""

from __future__ import annotations

from llmpulse.config.base import Section


class NotifyConfig(Section):
    pass
