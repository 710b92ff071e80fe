"""Config section `dashboard`."""

from __future__ import annotations

from llmpulse.config.base import Section


class DashboardConfig(Section):
    pass
