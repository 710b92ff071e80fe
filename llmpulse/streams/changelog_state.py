"""Stage 1's window state: the records of its changelog, and which keys are live.

The values live in the windows themselves (windowing.py); this map holds only the live
keys (to know what a close must delete) and, after a restore, the values read back until
stage 1 loads them. It used to keep a copy of every value written: a to_state dict of
each open accumulator, about 2 KB each, which at 10,000 users was hundreds of MB of
memory holding what the windows already held.

Keys are text `"<partition>|..."` (window_state.py); a key lives in the changelog
partition it names, the partition of the source partition it was computed from, so
whoever is assigned that source partition reads it back (restore.py). Records are JSON
keys and values, tombstones for deletions: the format Faust's tables wrote, so a state
written before stage 1 left Faust's tables restores unchanged.

Contract (the order is what makes a crash harmless):
- `state[key] = value`, `del state[key]`: mark the key live or gone at once and queue the
  record, in call order. Nothing blocks.
- `restore(partition, values)` (a partition read back from its changelog, restore.py):
  its keys are live, its values wait for `take_restored` (stage 1 loading a window state).
- `flush(publish)`: hand every queued record to `publish` in one call, in the order
  they were made (bulk_publish.py keeps a partition's records in that order: one
  batch per partition, not one awaited send per record), and return the delivery
  futures. A crash therefore leaves a prefix of the changes on the changelog, never a
  later change without an earlier one (the meta record, written after a batch's
  accumulators and id chunks, is never on the changelog without them).
- Offsets of a batch are committed only once every future `flush` returned after it
  has completed (commits.py): the state on the changelog covers the committed offsets.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec


def _value_encoder() -> Callable[[Any], str]:
    """`json.dumps(value)`, the same text, without its per-call set-up: C's encoder made once,
    without the check for circular containers (a state is a tree of dicts, lists and numbers
    made by to_state). About a third of the cost of a state record's text."""
    enc = json.JSONEncoder()
    c_encoder = getattr(json.encoder, "c_make_encoder", None)
    if c_encoder is None:  # a Python without the C accelerator
        return json.dumps
    iterencode = c_encoder(
        None, enc.default, json.encoder.encode_basestring_ascii, enc.indent, enc.key_separator,
        enc.item_separator, enc.sort_keys, enc.skipkeys, enc.allow_nan,
    )  # fmt: skip
    return lambda value: "".join(iterencode(value, 0))


# a record's key and value text, as json.dumps writes them (changelog_map.py writes stage 2's
# records with the same two): json.dumps of a str key is exactly KEY_TEXT (ASCII, escaped: the
# \x1f separators of window_state.py)
KEY_TEXT: Callable[[str], str] = json.encoder.encode_basestring_ascii
VALUE_TEXT = _value_encoder()
# a W record's items (window_state.py): msgspec writes the same JSON values as `json.dumps`
# (floats in their shortest form that reads back to the same float, int keys as strings), with
# no blanks between tokens and text beyond ASCII as UTF-8, at about a fifth of the cost. One
# such text per changed accumulator per batch was the largest part of writing stage 1's state
_ENCODE_INTO: Callable[[Any, bytearray, int], None] = msgspec.json.Encoder().encode_into
_COMMA, _CLOSE = ord(","), ord("}")


class EncodedMapping:
    """A JSON object value made item by item as its encoded text (UTF-8), so that its writer
    knows its size in bytes as it grows (window_state.py bounds a record of many accumulators
    by it); `flush` sends that text (`record_value`). Only a writer: nothing keeps the values
    themselves, and what reads the record back decodes its text, as restore.py does.

    Each item is encoded straight into the text, in one call: `{"key":value}` written over the
    text's closing brace, its `{` then made the `,` between items (no text per item made,
    concatenated and joined again)."""

    __slots__ = ("buf", "items")

    def __init__(self) -> None:
        self.buf = bytearray()  # the text, once it has an item
        self.items = 0

    @property
    def size(self) -> int:
        """The text's length in bytes."""
        return len(self.buf) or 2

    def add(self, key: str, value: Any, limit: int | None = None) -> bool:
        """Add the item `key: value`, of a key not added yet, its text made now (what `value` holds
        now); unless, with an item already in, that would make the text longer than `limit`
        bytes: then nothing is added (False)."""
        buf = self.buf
        if not buf:
            _ENCODE_INTO({key: value}, buf, 0)
        else:
            end = len(buf) - 1
            _ENCODE_INTO({key: value}, buf, end)  # the buffer ends where the item's text does
            if limit is not None and len(buf) > limit:
                del buf[end:]
                buf.append(_CLOSE)
                return False
            buf[end] = _COMMA
        self.items += 1
        return True

    def text(self) -> bytes:
        return bytes(self.buf) if self.buf else b"{}"

    def __len__(self) -> int:
        """Its items."""
        return self.items


def record_value(value: Any) -> bytes:
    """The bytes a record's value (not a tombstone) is sent as: what restore.py reads back
    with `json.loads`."""
    return value.text() if type(value) is EncodedMapping else VALUE_TEXT(value).encode()


# (topic, [(partition, key, value or None for a tombstone)] in order) -> the deliveries to wait for
Publish = Callable[[str, list[tuple[int | None, bytes | None, bytes | None]]], Awaitable[list[Awaitable[Any]]]]


class ChangelogState:
    """The live keys of a state whose every change queues a changelog record."""

    def __init__(self, name: str, topic: str) -> None:
        self.name = name
        self.topic = topic
        self.live: set[str] = set()
        self.restored: dict[str, Any] = {}  # values read back, not loaded by stage 1 yet
        self.queued: list[tuple[int, str, Any]] = []  # (partition, key, value or None)

    @staticmethod
    def partition_of(key: str) -> int:
        return int(key.split("|", 1)[0])

    def __setitem__(self, key: str, value: Any) -> None:
        self.live.add(key)
        self.restored.pop(key, None)  # a newer value than the one read back
        self.queued.append((self.partition_of(key), key, value))

    def __delitem__(self, key: str) -> None:
        self.live.remove(key)
        self.restored.pop(key, None)
        self.queued.append((self.partition_of(key), key, None))

    def __contains__(self, key: object) -> bool:
        return key in self.live

    def restore(self, partition: int, values: dict[str, Any]) -> None:
        """A partition's state read back from its changelog, in place of what was known of it."""
        self.drop_partition(partition)
        self.live.update(values)
        self.restored.update(values)

    def take_restored(self, prefix: str) -> list[tuple[str, Any]]:
        """The values read back under `prefix`, handed over once (their keys stay live)."""
        out = [(k, v) for k, v in self.restored.items() if k.startswith(prefix)]
        for k, _ in out:
            del self.restored[k]
        return out

    def drop_partition(self, partition: int) -> None:
        """Forget a partition's keys in memory (it is restored from the changelog, or revoked)."""
        prefix = f"{partition}|"
        self.live = {k for k in self.live if not k.startswith(prefix)}
        for k in [k for k in self.restored if k.startswith(prefix)]:
            del self.restored[k]

    async def flush(self, publish: Publish) -> list[Awaitable[Any]]:
        """Publish the queued records in order; their delivery futures."""
        queued, self.queued = self.queued, []
        if not queued:
            return []
        key_text = KEY_TEXT
        records: list[tuple[int | None, bytes | None, bytes | None]] = [
            (partition, key_text(key).encode(), None if value is None else record_value(value))
            for partition, key, value in queued
        ]
        return await publish(self.topic, records)
