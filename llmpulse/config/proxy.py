"""Config section `proxy`."""

from __future__ import annotations

from llmpulse.config.base import Section


class ProxyConfig(Section):
    pass
