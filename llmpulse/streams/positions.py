"""Positions of events inside a partition: the message offset plus the index in its batch.

One integer orders every event of a partition (message by message, then within a
message's batch), so the window state can record "applied through this event" across
batch envelopes and single-event messages alike. Format and parse side by side."""

from __future__ import annotations

BATCH_SLOTS = 1 << 20  # more than MAX_BATCH_EVENTS events per message


def position(offset: int, index: int) -> int:
    return offset * BATCH_SLOTS + index


def message_of(pos: int) -> int:
    """The message offset of a position."""
    return pos // BATCH_SLOTS
