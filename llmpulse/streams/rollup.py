"""Roll-up of a closed window's finest accumulators into its dimension sets, the same to the bit
as merging the finest accumulators of each set's group one by one in key order.

That order is the guarantee: a window closed again after a restore must give the same state
(float sums depend on the order of their terms), or the finalizer would publish it again with
other figures. The plain way, every finest accumulator merged once per dimension set, made a
window's close cost about (finest tuples x dimension sets) merges; with many users and keys
almost every finest tuple holds one event, so each event was merged about nine times (10 s:
3 sets, 60 s: 6) and closing windows was a quarter of the worker's time.

So a set is derived, where that is exact, from a set already merged: the same set of the
smaller windows a window is made of (a 60 s window per model from the six 10 s ones), or a set
with more members (per model from per model, provider and app), each group of that source
being one run of consecutive finest accumulators (in key order) of a group of the set derived.
Then
- integers add in any order;
- error types and sketch bins, merged run after run, are inserted in the order a one-by-one
  merge inserts them (first seen in key order), so even the dicts' order is the same;
- float sums are not decomposable (((a + b) + c) is not a + (b + c)): they are added again
  from the finest accumulators' terms (Accumulator.terms: for calls their float sums), in key
  order, as the one-by-one merge adds them (Accumulator.merged_from);
and the groups' members are found from the runs, not by projecting every finest tuple again.
A set that no other is derived from keeps no terms.

A group of one accumulator (most groups, where many users and keys make most finest tuples hold
a few events) is that accumulator, not a merged copy: merging one accumulator into a new one
gives its state to the bit (integers and float sums added to zero, a sum from 0.0 never being
-0.0; maxima from their initial value, which the accumulator already passed; dicts copied in
order), so the copy cost an allocation (two sketches for calls) and a merge for nothing. It is
only read: the finest accumulators of a closed window are final (its events are late from then
on), and a roll-up of late accumulators is turned into states at once (windowing.py).

Keys are sorted by (smallest window start, tuple). A source's groups are runs of the derived
set's groups in two cases:
- the same set of smaller windows: a window holds their keys one window after the other;
- a set with more members, of smallest windows (one start: keys sorted by tuple alone), whose
  extra members are the first members, in tuple order, of those the derived set lacks: within
  a group of the derived set, the keys sharing those first members are consecutive.
And the source must have left out no finest tuple: a set leaves out the tuples where one of its
members is "" (unattributed), which the derived set holds if only its own members are set.

The sets of smaller windows are kept in memory (`kept`) until the largest window holding
them is closed; after a restart they are gone, and a window is rolled up from its finest
accumulators again: the same state, as tests/test_rollup.py checks against the one-by-one merge.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from operator import itemgetter
from typing import Any, TypeVar

from llmpulse.schemas.aggregate import dimensions_key
from llmpulse.streams.accumulators import Accumulator

_T = TypeVar("_T")
Members = tuple[int, ...]  # a dimension set: indexes of its members in the finest tuple
AccKey = tuple[int, tuple[str, ...]]


@dataclass(slots=True)
class Span:
    """The finest accumulators of one smallest window that a close rolls up, sorted by key: read
    by each window holding it (a 10 s window and its 60 s one), so each key is looked up, and its
    tuple taken, once per close, not once per window."""

    start: int
    keys: list[AccKey]  # sorted
    finest: list[Any]  # their accumulators
    _tuples: list[tuple[str, ...]] | None = None

    def tuples(self) -> list[tuple[str, ...]]:
        """The keys' dimension tuples (made when a set is first grouped from the finest)."""
        if self._tuples is None:
            self._tuples = [k[1] for k in self.keys]
        return self._tuples


@dataclass(slots=True)
class Rolled:
    """One dimension set of one window: its groups in the order their first key comes, as lists of
    one item per group, not an object per group (a 60 s window per user is 10,000 groups; each
    object one more for the cyclic GC to walk while the set is kept for larger windows)."""

    left_out: int  # finest tuples the set does not hold (a member "")
    values: list[tuple[str, ...]]  # each group's values, in the order of the set's members
    accs: list[Any]  # each group merged
    # each group's finest accumulators as the terms (Accumulator.terms) of runs of them, in key
    # order; empty where no set is derived from this one
    terms: list[list[Any]]


def group_by_set(
    members: Members, tuples: Iterable[tuple[str, ...]], items: Iterable[_T]
) -> dict[tuple[str, ...], list[_T]]:
    """`items` (one per finest tuple of `tuples`) grouped by the tuples' values of the dimension
    set `members`, groups and items in first-seen order. A tuple is left out when a member is
    "" (unattributed): a set groups only the tuples that have all its members."""
    groups: dict[tuple[str, ...], list[_T]] = {}
    if not members:
        every = list(items)
        if every:
            groups[()] = every
        return groups
    get = itemgetter(*members)
    if len(members) > 1:
        for tup, item in zip(tuples, items, strict=True):
            v = get(tup)
            if "" in v:
                continue
            g = groups.get(v)
            if g is None:
                groups[v] = [item]
            else:
                g.append(item)
        return groups
    by_value: dict[str, list[_T]] = {}  # one member: its value alone, no tuple per item
    for tup, item in zip(tuples, items, strict=True):
        v = get(tup)
        if v == "":
            continue
        g = by_value.get(v)
        if g is None:
            by_value[v] = [item]
        else:
            g.append(item)
    for v, g in by_value.items():
        groups[(v,)] = g
    return groups


def runs_of(derived: Members, source: Members, width: int) -> bool:
    """Whether each group of `source` (of keys sorted by tuple) is a run of consecutive keys of
    a group of `derived`: the source holds the derived set's members and, beyond them, the first
    members (in tuple order) of those the derived set lacks."""
    if not set(derived) <= set(source):
        return False
    extra = set(source) - set(derived)
    lacked = [i for i in range(width) if i not in derived]
    return extra == set(lacked[: len(extra)])


class RollUp:
    """The roll-up of one source partition's windows (PartitionWindows), with its plan: where
    each dimension set of each window size is derived from (in order of preference), and which
    sets of smaller windows are kept for that."""

    def __init__(
        self,
        acc_cls: type[Accumulator],
        windows_s: Sequence[int],
        sets_of: Mapping[int, Sequence[tuple[tuple[str, ...], Members]]],
    ) -> None:
        self.acc_cls = acc_cls
        self.sets_of = sets_of
        width = len(acc_cls.dimension_names)
        sizes = sorted(windows_s)
        self.max_ms = sizes[-1] * 1000
        # sources of each (size, set): larger windows first (fewer runs), then fewer members
        self.sources: dict[tuple[int, Members], list[tuple[int, Members]]] = {}
        self.keep: dict[int, set[Members]] = {s: set() for s in sizes}
        # per size its sets in the order they are rolled up: a source before the sets derived
        # from it (a source of the same size has more members)
        self.order: dict[int, list[Members]] = {}
        for s in sizes:
            members_here = [m for _, m in sets_of[s]]
            self.order[s] = sorted(members_here, key=lambda m: -len(m))
            for c in members_here:
                # the same set of smaller windows (a window's keys are theirs, one window after
                # the other), or a set with more members of smallest windows: keys are sorted by
                # (smallest window start, tuple), so only there are its groups runs of keys
                found = [
                    (s2, f)
                    for s2 in sizes
                    if s2 <= s and s % s2 == 0
                    for _, f in sets_of[s2]
                    if (sorted(f) == sorted(c) and s2 < s)
                    or (s2 == sizes[0] and len(f) > len(c) and runs_of(c, f, width))
                ]
                found.sort(key=lambda src: (-src[0], len(src[1])))
                self.sources[(s, c)] = found
                for s2, f in found:
                    if s2 < s:
                        self.keep[s2].add(f)
        # the sets others are derived from (kept for larger windows, or a source of their own
        # size): only these keep their groups' terms
        self.sourced: dict[int, set[Members]] = {s: set(self.keep[s]) for s in sizes}
        for (s, _), found in self.sources.items():
            self.sourced[s].update(f for s2, f in found if s2 == s)
        self.kept: dict[tuple[int, int, Members], Rolled] = {}
        # per set, its groups' (dims, dims_key) made during this close, and those of the last close
        # that rolled the set up: the windows of a close (dozens on sparse traffic) share most
        # values, and so do the windows of a set from one close to its next (the same users, keys,
        # models), so each is made once; the partials only read them. Two closes' values per set
        # at most are held (end_close)
        self.labels: dict[tuple[str, ...], dict[tuple[str, ...], tuple[dict[str, str], str]]] = {}
        self.last_labels: dict[tuple[str, ...], dict[tuple[str, ...], tuple[dict[str, str], str]]] = {}

    def window(
        self, s: int, t: int, spans: Sequence[Span], keep: bool
    ) -> list[tuple[dict[str, str], str, Accumulator]]:
        """(dims, dims_key, merged accumulator) of every group of every dimension set of window
        (s, t), whose finest accumulators are those of `spans` (its smallest windows, ascending);
        sets in their configured order, groups in the order of their first key. `keep`: the
        window's keys are final (a closed window, not its late events), its sets may be kept for
        larger windows."""
        n = sum(len(sp.finest) for sp in spans)
        if not n:
            return []
        merged = self.acc_cls.merged
        terms = self.acc_cls.terms
        sourced = self.sourced[s]
        done: dict[Members, Rolled] = {}
        for c in self.order[s]:
            rolled = None
            for s2, f in self.sources[(s, c)]:
                if s2 == s:
                    runs: list[Rolled | None] = [done.get(f)]
                elif keep:
                    size = s2 * 1000
                    runs = [self.kept.get((s2, t2, f)) for t2 in sorted({sp.start - sp.start % size for sp in spans})]
                else:
                    continue
                if all(r is not None and r.left_out == 0 for r in runs):
                    rolled = self._derive(c, f, [r for r in runs if r is not None], c in sourced)
                    break
            if rolled is None:
                # one pass over the spans' finest, not a list of the window's (each item's
                # reference count written: a read of memory a large window's close has not
                # in cache)
                if len(spans) == 1:
                    groups = group_by_set(c, spans[0].tuples(), spans[0].finest)
                else:
                    groups = group_by_set(
                        c, chain.from_iterable(sp.tuples() for sp in spans),
                        chain.from_iterable(sp.finest for sp in spans),
                    )  # fmt: skip
                members = list(groups.values())
                rolled = Rolled(
                    n - sum(map(len, members)),
                    list(groups),
                    [g[0] if len(g) == 1 else merged(g) for g in members],
                    [[terms(g)] for g in members] if c in sourced else [],
                )
            done[c] = rolled
        if keep:
            for f in self.keep[s]:
                self.kept[(s, t, f)] = done[f]
        out = []
        for names, c in self.sets_of[s]:
            labels = self.labels.get(names)
            if labels is None:
                labels = self.labels[names] = {}
            last = self.last_labels.get(names, {})
            rolled = done[c]
            for values, acc in zip(rolled.values, rolled.accs, strict=True):
                label = labels.get(values)
                if label is None:
                    label = last.get(values)
                    if label is None:
                        dims = dict(zip(names, values, strict=True))
                        label = (dims, dimensions_key(dims))
                    labels[values] = label
                out.append((label[0], label[1], acc))
        return out

    def end_close(self) -> None:
        """A close is done: its sets' labels are kept for their next close, in place of those
        of their previous one."""
        self.last_labels.update(self.labels)
        self.labels = {}

    def _derive(self, c: Members, f: Members, runs: list[Rolled], sourced: bool) -> Rolled:
        """Set `c` from the groups of `f` (runs of its groups, in key order, runs_of); `sourced`:
        other sets are derived from it (it keeps its groups' terms)."""
        pos = [f.index(i) for i in c]
        # the set's values from the source's: the same tuple (the same set of smaller windows),
        # one member, or several picked at once
        same = pos == list(range(len(f)))
        one = pos[0] if len(pos) == 1 else None
        pick = itemgetter(*pos) if len(pos) > 1 else None
        parts: dict[tuple[str, ...], tuple[list[Any], list[list[Any]]]] = {}
        for r in runs:
            for values, acc, group_terms in zip(r.values, r.accs, r.terms, strict=True):
                if same:
                    v = values
                elif one is not None:
                    v = (values[one],)
                elif pick is not None:
                    v = pick(values)
                else:
                    v = ()
                slot = parts.get(v)
                if slot is None:
                    parts[v] = ([acc], [group_terms])
                else:
                    slot[0].append(acc)
                    slot[1].append(group_terms)
        merged_from = self.acc_cls.merged_from
        out = Rolled(0, list(parts), [], [])
        for accs, part_runs in parts.values():
            if len(accs) == 1:  # one run: its merged accumulator is the group's
                out.accs.append(accs[0])
                if sourced:
                    out.terms.append(part_runs[0])
                continue
            group_runs = list(chain.from_iterable(part_runs))  # the terms of its runs, in order
            out.accs.append(merged_from(accs, group_runs))
            if sourced:
                out.terms.append(group_runs)
        return out

    def forget_through(self, mark_ms: float) -> None:
        """Drop the kept sets of smaller windows whose largest window ended by `mark_ms` (closed)."""
        max_ms = self.max_ms
        for key in [k for k in self.kept if k[1] - k[1] % max_ms + max_ms <= mark_ms]:
            del self.kept[key]
