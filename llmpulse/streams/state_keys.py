"""Keys of stage 2's state (the `final` table), format and parse side by side.

Every key starts with its partials partition (worker_app.PartitionedTable: the changelog
partition the state lives in), then a one-letter shape:

    <fp>|O                              the last partials offset applied
    <fp>|M|<kind>|<source>              a source's close mark
    <fp>|F|<kind>                       event time finalized through
    <fp>|W|<kind>|<s>|<start>|<source>|<chunk>   one received partials message (its sets,
                                        as one JSON text: partials.encode_sets)
    <fp>|V|<kind>|<s>|<start>           the revisions of a published window
    <fp>|P|<kind>|<s>|<start>|<dims_key>         one dimension set of a window (previous
                                        version's state: read, never written)
    <fp>|R|<kind>|<s>|<dims_key>        rule state of a dimension set

Sources and kinds hold no `|`; a dims_key may, so it is always last.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

Shape = Literal["O", "M", "F", "W", "V", "P", "R"]


class StateKey(NamedTuple):
    partition: int
    shape: Shape
    kind: str = ""
    window_s: int = 0
    start_ms: int = 0
    source: str = ""
    chunk: int = 0
    dims_key: str = ""


def applied_key(fp: int) -> str:
    return f"{fp}|O"


def mark_key(fp: int, kind: str, source: str) -> str:
    return f"{fp}|M|{kind}|{source}"


def finalized_key(fp: int, kind: str) -> str:
    return f"{fp}|F|{kind}"


def chunk_key(fp: int, kind: str, window_s: int, start_ms: int, source: str, chunk: int) -> str:
    return f"{fp}|W|{kind}|{window_s}|{start_ms}|{source}|{chunk}"


def revisions_key(fp: int, kind: str, window_s: int, start_ms: int) -> str:
    return f"{fp}|V|{kind}|{window_s}|{start_ms}"


def legacy_pending_key(fp: int, kind: str, window_s: int, start_ms: int, dims_key: str) -> str:
    return f"{fp}|P|{kind}|{window_s}|{start_ms}|{dims_key}"


def rule_key(fp: int, kind: str, window_s: int, dims_key: str) -> str:
    return f"{fp}|R|{kind}|{window_s}|{dims_key}"


def parse(key: str) -> StateKey | None:
    """The parts of a stage-2 key; None for a key of another shape (stage 1's)."""
    head, _, rest = key.partition("|")
    shape, _, rest = rest.partition("|")
    try:
        fp = int(head)
        if shape == "O":
            return StateKey(fp, "O")
        if shape == "M":
            kind, _, source = rest.partition("|")
            return StateKey(fp, "M", kind, source=source)
        if shape == "F":
            return StateKey(fp, "F", rest)
        if shape == "W":
            kind, s, start, source, chunk = rest.split("|")
            return StateKey(fp, "W", kind, int(s), int(start), source, int(chunk))
        if shape == "V":
            kind, s, start = rest.split("|")
            return StateKey(fp, "V", kind, int(s), int(start))
        if shape == "P":
            kind, s, start, dk = rest.split("|", 3)
            return StateKey(fp, "P", kind, int(s), int(start), dims_key=dk)
        if shape == "R":
            kind, s, dk = rest.split("|", 2)
            return StateKey(fp, "R", kind, int(s), dims_key=dk)
    except ValueError:
        return None
    return None
