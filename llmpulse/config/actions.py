"""Config section `actions`."""

from __future__ import annotations

from llmpulse.config.base import Section


class ActionsConfig(Section):
    pass
