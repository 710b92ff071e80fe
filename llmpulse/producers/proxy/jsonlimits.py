"""Bounded JSON decoding: nesting depth checked before any recursive decoder runs.

msgspec (like the stdlib `json`) decodes nested arrays and objects by recursing in
C. Under Python 3.11 its only guard is the interpreter's recursion limit: at the
default limit a body of 1,000 nested ``[`` raises `RecursionError` (which the
proxy's handlers did not expect: HTTP 500 with a traceback), and in a process that
raised the limit, 100k levels overflow the C stack and kill the proxy. So every
JSON body the proxy decodes, from a client or from an upstream, first passes
`depth_problem()`, which needs no recursion:

- a body with at most `MAX_DEPTH` brackets cannot nest deeper: two `bytes.count`
  calls, the whole cost for almost every request;
- otherwise escaped backslashes and quotes are dropped (two `bytes.replace`), all
  but quotes and brackets too, brackets becoming +1/-1 bytes (one `bytes.translate`),
  and what lies between quote pairs (string contents) is cut out (`split`/`join`
  at the quotes: every other piece is outside strings); a run of `MAX_DEPTH` + 1 opening
  brackets (the usual attack) is found by one `bytes.find`, else the deepest point
  is the maximum running sum (`itertools.accumulate`, a C loop).

The running sum bounds what msgspec would reach: it stops at the first bracket that
does not fit, and until then its depth is exactly that sum. The cost is linear in
the body (about 40 ns per structural bracket in the worst case), never recursive.
`MAX_DEPTH` (128) is far above what requests nest (messages, content blocks, tool
JSON schemas: around 10 to 30 levels) and far below where msgspec gives up.
"""

from __future__ import annotations

from itertools import accumulate
from typing import Any, TypeVar

import msgspec

from llmpulse.schemas.nesting import InputTooComplex

MAX_DEPTH = 128
T = TypeVar("T")

_NOT_BRACKETS = bytes(b for b in range(256) if b not in b'"[]{}')
_AS_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1 / -1 as signed bytes
_plain = msgspec.json.Decoder()


JsonLimitError = InputTooComplex
"""A JSON text the proxy will not decode: nested too deeply."""


def depth_problem(data: bytes, limit: int = MAX_DEPTH) -> str | None:
    """Why `data` must not be decoded (nested deeper than `limit`), or None."""
    if data.count(b"[") + data.count(b"{") <= limit:
        return None
    unescaped = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    steps = b"".join(unescaped.translate(_AS_STEPS, _NOT_BRACKETS).split(b'"')[::2])
    if b"\x01" * (limit + 1) in steps or max(accumulate(memoryview(steps).cast("b")), default=0) > limit:
        return f"nested deeper than {limit} levels"
    return None


def decode_bounded(data: bytes, decoder: msgspec.json.Decoder[T] | None = None) -> T | Any:
    """`decoder.decode(data)` (an untyped decoder by default) after the depth check.

    Raises `JsonLimitError` (too deep, or a RecursionError met anyway),
    `msgspec.DecodeError` / `msgspec.ValidationError` as the decoder does.
    """
    problem = depth_problem(data)
    if problem is not None:
        raise JsonLimitError(problem)
    try:
        return (decoder or _plain).decode(data)
    except RecursionError:  # a deep stack already: still a clean refusal
        raise JsonLimitError(f"nested deeper than the decoder allows here (limit {MAX_DEPTH} levels)") from None


DECODE_ERRORS = (msgspec.DecodeError, JsonLimitError)
"""What decoding an untrusted body may raise (ValidationError is a DecodeError)."""
