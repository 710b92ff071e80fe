"""Configuration: one YAML file, every key overridable from LLMPULSE_* variables."""

from llmpulse.config.loader import ConfigError, load_settings
from llmpulse.config.model import Settings

__all__ = ["ConfigError", "Settings", "load_settings"]
