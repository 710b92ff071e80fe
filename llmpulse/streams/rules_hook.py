"""Connect the rules engine (llmpulse.streams.rules) to the finalizer."""

from __future__ import annotations

from llmpulse.config import Settings
from llmpulse.streams.rules.hook import RulesHook, RulesRuntime


def load_rules_hook(settings: Settings) -> RulesHook | None:
    """The rules of `rules_file` (or the shipped defaults), reloaded when the file changes."""
    return RulesRuntime.from_settings(settings)
