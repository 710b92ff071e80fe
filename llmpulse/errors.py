"""Errors that stop a command with a clear message instead of a traceback."""

from __future__ import annotations


class LLMPulseError(Exception):
    """Base of errors shown to the user as one message and a non-zero exit."""


class BrokerError(LLMPulseError):
    pass


class StoreError(LLMPulseError):
    pass
