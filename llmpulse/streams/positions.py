"""Positions of events inside a partition: the message offset plus the index in its batch."""

from __future__ import annotations

BATCH_SLOTS = 1 << 20  # more than MAX_BATCH_EVENTS events per message


def position(offset: int, index: int) -> int:
    return offset * BATCH_SLOTS + index
