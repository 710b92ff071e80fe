"""Bounded parsing: nesting depth and size limits for every document that arrives from outside.

The failure it defends against: a small input that nests deeply (``[[[[...]]]]``, 200 KB
is enough) makes a recursive parser, ``repr`` or ``json.dumps`` raise ``RecursionError``,
which escapes as an HTTP 500 or kills a consumer; a YAML alias bomb (a few hundred bytes)
expands to billions of nodes in anything that walks it. The guarantee: `loads_json`
either returns a document no deeper than the limit or raises `InputTooComplex` (a
``ValueError``) whose message is the reason to show; `nesting_error` checks an already
parsed document without recursion and stops as soon as a limit is passed, so its cost
is bounded by the limits, not by the input.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

MAX_DEPTH = 64
"""Containers inside containers. No llmpulse document needs more than about 6."""


class InputTooComplex(ValueError):
    """A document nested deeper, or holding more values, than the limits allow."""


def nesting_error(doc: Any, max_depth: int = MAX_DEPTH, max_nodes: int | None = None) -> str | None:
    """The reason `doc` is too deep or too large (with where), or None. Iterative: never recurses.

    Shared sub-documents (YAML anchors) are counted each time they are reached, as
    anything that later walks the document would reach them.
    """
    stack: list[tuple[Any, int, tuple[Any, ...]]] = [(doc, 1, ())]
    nodes = 0
    while stack:
        obj, depth, path = stack.pop()
        items: Any
        if isinstance(obj, dict):
            items = obj.items()
        elif isinstance(obj, (list, tuple, set, frozenset)):
            items = enumerate(obj)
        else:
            continue
        if depth > max_depth:
            return f"nested deeper than {max_depth} levels{_at(path)}"
        nodes += len(obj)
        if max_nodes is not None and nodes > max_nodes:
            return f"more than {max_nodes} values{_at(path)}"
        for key, child in items:
            if isinstance(child, (dict, list, tuple, set, frozenset)):
                stack.append((child, depth + 1, (*path, key) if len(path) < 8 else path))
    return None


def _at(path: tuple[Any, ...]) -> str:
    # The first levels name the place (a config key, a batch index); deeper ones add nothing.
    if not path:
        return ""
    shown = ".".join(str(p) for p in path)
    return f" (at '{shown}{'...' if len(path) >= 8 else ''}')"


def loads_json(
    raw: bytes | str,
    loads: Callable[[Any], Any] = json.loads,
    max_depth: int = MAX_DEPTH,
) -> Any:
    """Parse JSON with `loads`; raise ValueError (InputTooComplex when too deep) on bad input.

    The C parsers guard their own recursion and raise RecursionError cleanly; that becomes
    the same reason as a document under the interpreter's limit but over ours.
    """
    try:
        doc = loads(raw)
    except RecursionError:
        raise InputTooComplex(f"nested deeper than {max_depth} levels") from None
    reason = nesting_error(doc, max_depth)
    if reason is not None:
        raise InputTooComplex(reason)
    return doc
