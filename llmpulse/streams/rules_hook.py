"""Connect the rules engine to the finalizer (None until the rules engine is configured)."""

from __future__ import annotations

from llmpulse.config import Settings
from llmpulse.streams.worker_app import RulesHook


def load_rules_hook(settings: Settings) -> RulesHook | None:
    return None
