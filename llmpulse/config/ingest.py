"""Config section `ingest`."""

from __future__ import annotations

from llmpulse.config.base import Section


class IngestConfig(Section):
    pass
