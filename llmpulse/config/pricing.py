"""Config section `pricing`."""

from __future__ import annotations

from llmpulse.config.base import Section


class PricingConfig(Section):
    pass
