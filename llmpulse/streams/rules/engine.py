"""The rules engine: judges each final WindowAggregate, returns the Alert events to publish.

Usage (one state per dimension set, e.g. a changelog-backed table keyed by ``dims_key``)::

    engine = RulesEngine(load_rules(settings.rules_file, settings.worker.windows_s))
    state = table.get(agg.dims_key) or new_state()
    alerts = engine.evaluate(agg, state)      # mutates `state` in place
    table[agg.dims_key] = state               # plain JSON data: dicts, lists, str, int, float
    for alert in alerts: publish(alert)

In bulk, as the worker judges a publish's windows (the same verdicts, a window's
aggregates one rule at a time)::

    for agg, alerts, state in engine.judge(aggregates, lambda a: table.get(a.dims_key)):
        table[agg.dims_key] = state
        for alert in alerts: publish(alert)

A window a rule cannot judge (no value, too little baseline, fewer than ``min_requests``
even pooled with the windows before it: pooling.py) counts as clear: it breaks a ``for``
streak and counts towards ``resolve_after``.

A budget alert belongs to its UTC day: it fires once when the day's total passes
``warning``, escalates once at ``critical``, stays firing without repeats (a total does not
fall within a day), and resolves with the first window of the next day, whatever
``resolve_after`` says.

Call it with each dimension set's windows in window order. A window at or before the last
one judged for the same (kind, window size) is ignored, so a re-delivered window after a
crash neither repeats nor loses an alert. Everything is deterministic: timestamps come
from the window (``ts`` is the window end), and ``alert_id`` is a hash of the fingerprint,
the transition and the window, so a re-published alert carries the same id.

State format (version 1)::

    {"v": 1,
     "sig": "<rule set signature>",          # rules changed -> reconciled on next use
     "dims": {"model": "gpt-4o"},            # the dimension set (for sweep)
     "seen": {"calls/60": 1700000040000},    # last window start judged, ms, per kind/size
     "rules": {"<rule name>": {
         "k": "<data signature>",            # baseline/budget reset when this changes
         "streak": 0, "streak_start": 0,     # lifecycle (see lifecycle.py)
         "alert": null | {"severity", "started_at", "clear", "metric", "publish"},
         "baseline": {...},                  # anomaly rules (see baseline.py), and
         "kept_out": 0,                      # anomalous windows in a row left out of it
         "pool": {"k", "w"},                 # threshold rules: the last windows (pooling.py)
         "budget": {"day": 19700, "total": 0.0}}}}   # budget rules
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from functools import partial
from typing import Any, NamedTuple

from llmpulse.schemas import Alert, WindowAggregate, alert_fingerprint
from llmpulse.schemas.alert import RuleType, evidence_text
from llmpulse.streams.rules.baseline import (
    RATE_METRICS,
    Expectation,
    Observation,
    Summaries,
    observe,
)
from llmpulse.streams.rules.evidence import (
    ALONE_MIN,
    Verdict,
    cannot_breach,
    judge_anomaly,
    judge_threshold,
    more_severe,
    rounded,
)
from llmpulse.streams.rules.lifecycle import Transition, advance, firing_severity
from llmpulse.streams.rules.model import (
    ADDITIVE_METRICS,
    DAY_S,
    SEVERITY_RANK,
    AnomalyRule,
    BudgetRule,
    CompositeRule,
    Rule,
    RuleSet,
    Severity,
    SloRule,
    ThresholdRule,
    WindowRule,
)
from llmpulse.streams.rules.pooling import POOLED_METRICS, Sample, pooled
from llmpulse.streams.rules.slo import judge_slo
from llmpulse.streams.rules.summary import fmt_dims, fmt_span, fmt_time, fmt_value, fmt_window

STATE_VERSION = 2
KEEP_OUT_S = 3600  # the longest run of anomalous windows left out of an anomaly baseline
MAX_KEPT_SUMMARIES = 200_000  # baselines' Summaries kept (then all dropped; derivable again)
State = dict[str, Any]


class Judged(NamedTuple):
    """One aggregate a rule judges (``RulesEngine.judge``): the alerts to publish, in order,
    and the state of its dimension set, mutated in place (a new one when none was stored)."""

    aggregate: WindowAggregate
    alerts: list[Alert]
    state: State


# an aggregate of a window being judged: its rules, its state, the list its alerts go to
_Entry = tuple[WindowAggregate, tuple[WindowRule, ...], State, list[Alert]]
# the same once its state is checked: the aggregate, its rules' states, its alerts
_Judging = tuple[WindowAggregate, dict[str, State], list[Alert]]


def new_state() -> State:
    """An empty per-dimension-set state."""
    return {"v": STATE_VERSION, "sig": "", "seen": {}, "rules": {}}


def migrate_state(state: State) -> State:
    """Bring a stored state to STATE_VERSION in place.

    v1 -> v2: anomaly baselines changed format (robust seasonal buckets): they are
    dropped and rebuild from the next windows; streaks and open alerts are kept, so an
    incident firing across the upgrade resolves normally.
    """
    v = int(state.get("v", 1))
    if v < 2:
        for rst in (state.get("rules") or {}).values():
            if isinstance(rst, dict):
                rst.pop("baseline", None)
        state["v"] = 2
    return state


def _ms(ts: datetime) -> int:
    return round(ts.timestamp() * 1000)


def _from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


class RulesEngine:
    """Judges aggregates against a RuleSet. Cheap to build: rebuild it when the rules reload."""

    def __init__(
        self, rules: RuleSet | Iterable[Rule], windows_s: Iterable[int] | None = None
    ) -> None:
        self.rules = rules if isinstance(rules, RuleSet) else RuleSet(rules=tuple(rules))
        if windows_s is not None:
            allowed = set(windows_s)
            bad = [
                r.name
                for r in self.rules.rules
                if not isinstance(r, CompositeRule) and r.window not in allowed
            ]
            if bad:
                raise ValueError(
                    f"rules {bad} judge windows the worker does not make ({sorted(allowed)})"
                )
        self._by_name = self.rules.by_name()
        self.signature = hashlib.sha1(
            "|".join(f"{r.name}:{r.signature()}" for r in self.rules.rules).encode()
        ).hexdigest()[:16]
        self._data_sig = {r.name: r.data_signature() for r in self.rules.rules}
        index: dict[tuple[str, int, tuple[str, ...]], list[WindowRule]] = {}
        composites: dict[str, list[CompositeRule]] = {}
        for r in self.rules.rules:
            if isinstance(r, CompositeRule):
                for m in r.members:
                    composites.setdefault(m, []).append(r)
            else:
                for dims in r.dim_sets:
                    index.setdefault((r.kind, r.window, dims), []).append(r)
        self._index = {k: tuple(v) for k, v in index.items()}
        self._sizes = frozenset(k[1] for k in self._index)  # the window sizes rules judge
        self._composites_of = {k: tuple(v) for k, v in composites.items()}
        self._rules_by_names: dict[tuple[str, int, tuple[str, ...]], tuple[WindowRule, ...]] = {}
        # per series (rule, then dimension set: a rule judges one kind and window size): what
        # its anomaly baseline implies, kept beside the state, never in it (baseline.Summaries);
        # rebuilt when the series' state is another object than the one it was derived from
        # (restored, reset, another worker's); all dropped at MAX_KEPT_SUMMARIES
        self._summaries: dict[str, dict[str, Summaries]] = {}
        self._summaries_kept = 0

    # -- public ---------------------------------------------------------------------------

    def applies(self, agg: WindowAggregate) -> bool:
        """Whether any rule judges this aggregate's kind, window size and dimension names."""
        return bool(self._rules_of(agg))

    def _rules_of(self, agg: WindowAggregate) -> tuple[WindowRule, ...]:
        """The rules that judge this aggregate (its kind, window size and dimension names), in
        rule order: the one place an aggregate's index key is built. Looked up by its names in
        their own order, so the names are sorted once per such order (a handful), not once per
        aggregate."""
        key = (agg.kind, agg.window_s, tuple(agg.dimensions))
        rules = self._rules_by_names.get(key)
        if rules is None:
            rules = self._index.get((agg.kind, agg.window_s, tuple(sorted(agg.dimensions))), ())
            if len(self._rules_by_names) < 1024:  # bounded whatever names the aggregates carry
                self._rules_by_names[key] = rules
        return rules

    def evaluate(self, agg: WindowAggregate, state: State) -> list[Alert]:
        """Judge one final window of one dimension set; mutates ``state``; the alerts to publish."""
        rules = self._rules_of(agg)
        if not rules:
            return []
        alerts: list[Alert] = []
        self._judge_window([(agg, rules, state, alerts)])
        return alerts

    def judge(
        self, aggregates: Iterable[WindowAggregate], stored: Callable[[WindowAggregate], State | None]
    ) -> list[Judged]:
        """Judge final windows in bulk: each window's aggregates in one pass per rule.

        ``aggregates`` in the order their alerts are to be published; ``stored(agg)``: the
        stored state of the aggregate's dimension set (kind, window size, dimensions) or
        None, asked once per dimension set and call (a later window of the same set is
        judged on the state the earlier one left). One ``Judged`` per aggregate a rule
        judges (``applies``), in input order, with its alerts in the order ``evaluate``
        would return them and its state (mutated in place, a new one when none was stored:
        store it). The verdicts are ``evaluate``'s, aggregate by aggregate: an aggregate's
        rules run in rule order, and windows are judged in input order (a run of
        consecutive aggregates of one window at a time); only aggregates of other
        dimension sets, whose states are apart, are interleaved.
        """
        out: list[Judged] = []
        states: dict[tuple[str, int, str], State] = {}
        run: list[_Entry] = []
        window: tuple[str, int, datetime] | None = None
        rules_of = self._rules_of
        sizes = self._sizes
        for agg in aggregates:
            if agg.window_s not in sizes:  # no rule judges windows of this size (10 s ones)
                continue
            rules = rules_of(agg)
            if not rules:
                continue
            if (agg.kind, agg.window_s, agg.window_start) != window:
                if run:
                    self._judge_window(run)
                    run = []
                window = (agg.kind, agg.window_s, agg.window_start)
            series = (agg.kind, agg.window_s, agg.dims_key)
            state = states.get(series)
            if state is None:
                state = stored(agg)
                states[series] = state = new_state() if state is None else state
            alerts: list[Alert] = []
            run.append((agg, rules, state, alerts))
            out.append(Judged(agg, alerts, state))
        if run:
            self._judge_window(run)
        return out

    def sweep(
        self, state: State, now: datetime, dimensions: dict[str, str] | None = None
    ) -> list[Alert]:
        """Resolve the open alerts of a dimension set whose windows stopped coming.

        A dimension set without traffic gets no aggregates, so its alerts would never see
        a clear window. Windows without data count as clear: an alert resolves once
        ``resolve_after`` of them have ended by ``now`` (pass the worker's event-time clock,
        e.g. the end of the last window it closed, to stay deterministic). A budget alert
        resolves with the next UTC day. Rules for which silence is itself the breach
        (``below`` on requests, tokens, cost...) are left alone. Mutates ``state``.
        """
        if dimensions is None:
            dimensions = dict(state.get("dims") or {})
        alerts: list[Alert] = []
        all_states: dict[str, State] = state.get("rules") or {}
        seen: dict[str, int] = state.setdefault("seen", {})
        now_ms = _ms(now)
        last_window: tuple[datetime, datetime] | None = None
        for name, rst in all_states.items():
            alert = rst.get("alert")
            rule = self._by_name.get(name)
            if alert is None or rule is None or isinstance(rule, CompositeRule):
                continue
            if (
                isinstance(rule, (ThresholdRule, AnomalyRule))
                and rule.direction == "below"
                and rule.metric in ADDITIVE_METRICS
            ):
                continue
            key = f"{rule.kind}/{rule.window}"
            last = seen.get(key)
            if last is None:
                continue
            w_ms = rule.window * 1000
            if isinstance(rule, BudgetRule):  # resolves with the day, not after clear windows
                start = ((last // 1000) // DAY_S + 1) * DAY_S * 1000
                why = "the daily budget starts again at 00:00 UTC"
            else:
                start = last + (rule.resolve_after - int(alert.get("clear", 0))) * w_ms
                why = f"no data since {fmt_time(_from_ms(last + w_ms))}"
            if start + w_ms > now_ms:
                continue
            rst["alert"] = None
            rst["streak"] = 0
            seen[key] = max(int(seen[key]), start)
            window = (_from_ms(start), _from_ms(start + w_ms))
            if last_window is None or window[1] > last_window[1]:
                last_window = window
            if alert.get("publish", True):
                tr = Transition("resolved", alert["severity"], int(alert["started_at"]))
                text = (
                    f"resolved: {rule.metric} {why} {fmt_dims(dimensions)} "
                    f"(firing since {fmt_time(_from_ms(tr.started_at_ms))})"
                )
                alerts.append(
                    _build_at(
                        name, rule.metric, tr, None, None, None, dimensions, *window, text,
                        rule.type,
                    )
                )  # fmt: skip
        if last_window is None:
            return alerts
        for comp in self.rules.rules:
            if not isinstance(comp, CompositeRule):
                continue
            cst = all_states.get(comp.name)
            alert = cst.get("alert") if cst else None
            if cst is None or alert is None:
                continue
            firing = {m: firing_severity(all_states.get(m)) for m in comp.members}
            if _composite_level(comp, firing)[1] is not None:
                continue
            cst["alert"] = None
            cst["streak"] = 0
            if alert.get("publish", True):
                tr = Transition("resolved", alert["severity"], int(alert["started_at"]))
                text = f"resolved: {comp.name}: its rules no longer fire {fmt_dims(dimensions)}"
                alerts.append(
                    _build_at(
                        comp.name, "composite", tr, None, None, None, dimensions, *last_window, text,
                        "composite",
                    )
                )  # fmt: skip
        return alerts

    # -- judging ------------------------------------------------------------------------

    def _judge_window(self, entries: list[_Entry]) -> None:
        """Judge aggregates of one window (kind, size, start), each with its rules, its state
        and the list its alerts go to: the checks per state first, then each group of
        aggregates sharing their rules one rule at a time, then their composites."""
        first = entries[0][0]
        start_ms = _ms(first.window_start)
        seen_key = f"{first.kind}/{first.window_s}"
        groups: dict[int, tuple[tuple[WindowRule, ...], list[_Judging]]] = {}
        for agg, rules, state, alerts in entries:
            if state.get("v", 1) != STATE_VERSION:
                migrate_state(state)
            if state.get("sig") != self.signature:
                self._reconcile(agg, state, alerts)
            seen: dict[str, int] = state["seen"]
            last = seen.get(seen_key)
            if last is not None and start_ms <= last:
                continue  # judged before (a re-delivered window)
            seen[seen_key] = start_ms
            if "dims" not in state:
                state["dims"] = dict(agg.dimensions)
            group = groups.get(id(rules))
            if group is None:
                group = groups[id(rules)] = (rules, [])
            group[1].append((agg, state["rules"], alerts))
        for rules, judging in groups.values():
            for rule in rules:
                if isinstance(rule, AnomalyRule):  # the commonest (types are disjoint)
                    self._judge_anomalies(rule, judging, start_ms)
                else:
                    self._judge_rule(rule, judging, start_ms)
            composites = self._composites_of
            if any(r.name in composites for r in rules):
                for agg, all_states, alerts in judging:
                    touched: list[CompositeRule] = []
                    for rule in rules:
                        if _matches(rule, agg.dimensions):
                            for comp in composites.get(rule.name, ()):
                                if comp not in touched:
                                    touched.append(comp)
                    for comp in touched:
                        self._evaluate_composite(comp, agg, all_states, start_ms, alerts)

    def _judge_rule(
        self, rule: ThresholdRule | SloRule | BudgetRule, judging: list[_Judging], start_ms: int
    ) -> None:
        """One rule but an anomaly rule (``_judge_anomalies``) over the aggregates of one
        window that it judges."""
        name = rule.name
        data_sig = self._data_sig[name]
        dims_match = rule.match
        for_windows = rule.for_ if isinstance(rule, ThresholdRule) else 1
        for agg, all_states, alerts in judging:
            if dims_match and not _matches(rule, agg.dimensions):
                continue
            rst = all_states.get(name)
            if rst is None:
                rst = all_states[name] = {"k": data_sig, "streak": 0}
            if isinstance(rule, ThresholdRule):
                verdict = judge_threshold(rule, agg, rst)
            elif isinstance(rule, SloRule):
                verdict = judge_slo(rule, agg, rst["slo"] if "slo" in rst else rst.setdefault("slo", {}))
            else:
                verdict, ended = _judge_budget(rule, agg, rst)
                if ended is not None and rst.get("alert") is not None:
                    self._end_budget_day(rule, agg, rst, ended, alerts)
            if verdict.level is None and rst.get("alert") is None:
                rst["streak"] = 0  # all advance does with a clear window and no alert open
                continue
            self._advance(rule, rst, verdict, agg, start_ms, for_windows, alerts)

    def _advance(
        self, rule: WindowRule, rst: State, verdict: Verdict, agg: WindowAggregate, start_ms: int,
        for_windows: int, alerts: list[Alert],
    ) -> None:  # fmt: skip
        """A judged window moves the series' alert on (``advance``); the alert of a change
        appended when the rule publishes."""
        tr = advance(
            rst, verdict.level, start_ms, metric=rule.metric,
            for_windows=for_windows, resolve_after=rule.resolve_after, hold=verdict.inconclusive,
        )  # fmt: skip
        if tr is not None:
            if tr.change == "fired":
                rst["alert"]["publish"] = rule.publish
            if rule.publish:
                alerts.append(self._alert(rule, tr, verdict, agg))

    def _judge_anomalies(self, rule: AnomalyRule, judging: list[_Judging], start_ms: int) -> None:
        """``_judge_rule`` for an anomaly rule, the commonest and most judged: the rule's
        figures read once per window, not once per aggregate, and a clear verdict with no
        alert open only resets the streak (all ``advance`` would do with it)."""
        name = rule.name
        data_sig = self._data_sig[name]
        dims_match = rule.match
        start_s = start_ms // 1000
        keep_out = max(1, KEEP_OUT_S // rule.window)
        # a low-traffic series' rate is pooled with the windows before it (pooling.py), which
        # index windows by the start's whole second (the same for a window's aggregates)
        pool_s = None
        if rule.metric in RATE_METRICS and rule.min_requests > 0 and rule.pool_windows > 1:
            pool_s = round(judging[0][0].window_start.timestamp())
        # the series' Summaries of this rule, looked up once per window (``_baseline``)
        of_rule = self._summaries.get(name)
        if of_rule is None:
            of_rule = self._summaries[name] = {}
        judge_one = self._judge_anomaly
        for agg, all_states, alerts in judging:
            if dims_match and not _matches(rule, agg.dimensions):
                continue
            rst = all_states.get(name)
            if rst is None:
                rst = all_states[name] = {"k": data_sig, "streak": 0}
            obs = observe(rule, agg)
            if obs is None:  # no value: nothing read, nothing counted (clear, or judged=False)
                if rst.get("alert") is None:
                    rst["streak"] = 0
                else:
                    self._advance(rule, rst, Verdict(None, None, None, judged=False), agg, start_ms, rule.for_, alerts)
                continue
            bst = rst["baseline"] if "baseline" in rst else rst.setdefault("baseline", {})
            baseline = of_rule.get(agg.dims_key)
            if baseline is None or baseline.state is not bst:
                baseline = self._baseline(rule, agg, bst)
                of_rule = self._summaries[name]  # a new dict when the kept ones were all dropped
            if pool_s is None and rst.get("alert") is None and cannot_breach(
                rule, obs, agg, mean_floor=partial(baseline.mean_floor, start_s)
            ):
                # the commonest window: clear whatever the baseline expects, no alert open, so
                # what _judge_anomaly does with it, here without its call: counted into the
                # baseline, the streak reset
                rst["kept_out"] = 0
                baseline.add(start_s, obs)
                rst["streak"] = 0
                continue
            verdict = judge_one(rule, agg, rst, obs, baseline, start_s, pool_s, keep_out)
            if verdict is None:  # clear, no alert open: all advance would do
                rst["streak"] = 0
                continue
            self._advance(rule, rst, verdict, agg, start_ms, rule.for_, alerts)

    def _baseline(self, rule: AnomalyRule, agg: WindowAggregate, bst: State) -> Summaries:
        """A new Summaries of this series' baseline state ``bst`` (none kept, or kept for
        another state object), kept for the series' next windows."""
        of_rule = self._summaries.get(rule.name)
        if of_rule is None:
            of_rule = self._summaries[rule.name] = {}
        summaries = of_rule.get(agg.dims_key)
        if summaries is None or summaries.state is not bst:
            if summaries is None:
                if self._summaries_kept >= MAX_KEPT_SUMMARIES:
                    self._summaries.clear()
                    self._summaries_kept = 0
                    of_rule = self._summaries[rule.name] = {}
                self._summaries_kept += 1
            summaries = of_rule[agg.dims_key] = Summaries(rule, bst)
        return summaries

    def _judge_anomaly(
        self, rule: AnomalyRule, agg: WindowAggregate, rst: State, obs: Observation,
        baseline: Summaries, start_s: int, pool_s: int | None, keep_out: int,
    ) -> Verdict | None:  # fmt: skip
        """One window of one series with a value (``obs``; ``baseline``: the Summaries of its
        baseline state): its verdict, or None for a clear one with no alert open, whose
        figures nothing reads (lifecycle.advance only resets the streak). ``pool_s``: the
        window start's second when the rule pools a low-traffic rate (pooling.py);
        ``keep_out``: the most anomalous windows in a row left out of the baseline."""
        closed = rst.get("alert") is None
        judged, span = obs, None
        if pool_s is not None:
            # a low-traffic series' rate: this window with the ones before it (pooling.py)
            s = pooled(rule, agg, rst, Sample(obs.volume, obs.value), pool_s)
            if s is not None and s.windows > 1:
                judged, span = Observation(s.value, round(s.value * s.n), s.n), s
        # clear whatever the baseline expects (evidence.cannot_breach), with no alert open: the
        # expectation is not derived
        if not closed:
            clear = False
        elif span is None:  # the window, then the window against the floor of its expected mean
            clear = cannot_breach(rule, obs, agg, mean_floor=lambda: baseline.mean_floor(start_s))
        else:  # pooled: the pooled sample, and the window alone (judged too from ALONE_MIN calls)
            clear = cannot_breach(rule, judged, agg, pooled=True) and (
                obs.volume < ALONE_MIN or cannot_breach(rule, obs, agg, pooled=True)
            )
        verdict = None
        if not clear:
            verdict = self._judge_expected(rule, agg, obs, judged, span, baseline.expected(start_s), baseline)
        # an incident does not teach the baseline: a window judged anomalous stays out of it
        # (else a 15-minute error burst lifted its own rolling baseline and "resolved" at 44%
        # errors), but for at most an hour of windows in a row: a level that stays is the new normal
        kept_out = int(rst.get("kept_out", 0))
        if verdict is not None and verdict.level is not None and kept_out < keep_out:
            rst["kept_out"] = kept_out + 1
        else:
            rst["kept_out"] = 0
            baseline.add(start_s, obs)
        if verdict is None or (closed and verdict.level is None):
            return None
        return verdict

    def _judge_expected(
        self, rule: AnomalyRule, agg: WindowAggregate, obs: Observation, judged: Observation,
        span: Sample | None, exp: Expectation | None, baseline: Summaries,
    ) -> Verdict:  # fmt: skip
        """The verdict on ``judged`` (``obs``, or pooled over ``span``: the windows before it)
        against ``exp``, what the baseline expects of the window."""
        verdict = judge_anomaly(rule, judged, exp, agg, baseline.dispersion, pooled=span is not None)
        if span is not None and verdict.judged and verdict.evidence:
            verdict.evidence["windows"] = span.windows
            verdict.evidence["span_s"] = span.span_s
            # a short window whose own calls already show the anomaly fires on them (the test is
            # exact at any n): pooled with the calm minutes before it, an error burst's first
            # minute on a quiet model (5 errors in 9 calls) was diluted below the evidence
            if obs.volume >= ALONE_MIN:
                alone = judge_anomaly(rule, obs, exp, agg, baseline.dispersion, pooled=True)
                if more_severe(alone, verdict):
                    alone.evidence["small_sample"] = "true"
                    verdict = alone
        return verdict

    # -- rules changed --------------------------------------------------------------------

    def _reconcile(self, agg: WindowAggregate, state: State, alerts: list[Alert]) -> None:
        state.setdefault("v", STATE_VERSION)
        state.setdefault("seen", {})
        all_states: dict[str, State] = state.setdefault("rules", {})
        for name in list(all_states):
            rst = all_states[name]
            if name not in self._by_name:
                del all_states[name]
                alert = rst.get("alert")
                if alert is not None and alert.get("publish", True):
                    tr = Transition("resolved", alert["severity"], int(alert["started_at"]))
                    alerts.append(
                        _build(
                            name, str(alert.get("metric", "")), tr, None, None, None, agg,
                            f"resolved: rule {name} was removed from the rules {fmt_dims(agg.dimensions)} "
                            f"(firing since {fmt_time(_from_ms(tr.started_at_ms))})",
                        )
                    )  # fmt: skip
            elif rst.get("k") != self._data_sig[name]:
                rst.pop("baseline", None)
                rst.pop("budget", None)
                rst.pop("slo", None)
                rst["k"] = self._data_sig[name]
        state["sig"] = self.signature

    # -- alerts ---------------------------------------------------------------------------

    def _end_budget_day(
        self, rule: BudgetRule, agg: WindowAggregate, rst: State, ended: State, alerts: list[Alert]
    ) -> None:
        """A new UTC day: the firing budget alert of the day before resolves now."""
        alert = rst["alert"]
        rst["alert"] = None
        rst["streak"] = 0
        if not alert.get("publish", True):
            return
        tr = Transition("resolved", alert["severity"], int(alert["started_at"]))
        day = datetime.fromtimestamp(int(ended["day"]) * DAY_S, tz=UTC).strftime("%Y-%m-%d")
        total = float(ended["total"])
        text = (
            f"resolved: {rule.metric} budget starts again at 00:00 UTC; {day} ended at "
            f"{fmt_value(rule.metric, total)} {fmt_dims(agg.dimensions)} "
            f"(firing since {fmt_time(_from_ms(tr.started_at_ms))})"
        )
        limit = rule.critical if alert["severity"] == "critical" else rule.warning
        alerts.append(
            _build(rule.name, rule.metric, tr, total, limit, None, agg, text, rule.type)
            .model_copy(update={"evidence": rounded({"day_total": total, "day": day})})
        )  # fmt: skip

    def _alert(self, rule: WindowRule, tr: Transition, v: Verdict, agg: WindowAggregate) -> Alert:
        alert = _build(
            rule.name,
            rule.metric,
            tr,
            v.value,
            v.threshold,
            v.baseline,
            agg,
            _summary(rule, tr, v, agg),
            rule.type,
        )
        if tr.change == "resolved" and not v.judged:
            return alert
        return alert.model_copy(
            update={
                "expected_low": v.expected_low,
                "expected_high": v.expected_high,
                "evidence": rounded(v.evidence) or None,
            }
        )

    def _evaluate_composite(
        self,
        comp: CompositeRule,
        agg: WindowAggregate,
        all_states: dict[str, State],
        start_ms: int,
        alerts: list[Alert],
    ) -> None:
        firing = {m: firing_severity(all_states.get(m)) for m in comp.members}
        active, level = _composite_level(comp, firing)
        rst = all_states.get(comp.name)
        if rst is None:
            rst = all_states[comp.name] = {"k": self._data_sig[comp.name], "streak": 0}
        tr = advance(rst, level, start_ms, metric="composite", resolve_after=comp.resolve_after)
        if tr is None:
            return
        if tr.change == "fired":
            rst["alert"]["publish"] = comp.publish
        if not comp.publish:
            return
        listed = ", ".join(f"{m} ({s})" if s else f"{m} (clear)" for m, s in firing.items())
        what = "all of" if comp.mode == "all_of" else "any of"
        where = f"{fmt_dims(agg.dimensions)} {fmt_window(agg.window_s, agg.window_end)}"
        if tr.change == "resolved":
            text = f"resolved: {comp.name}: {what} [{listed}] no longer firing {where}"
        else:
            text = f"{comp.name}: {what} [{listed}] firing ({tr.severity}) {where}"
        need = len(comp.members) if comp.mode == "all_of" else 1
        alerts.append(
            _build(
                comp.name, "composite", tr, float(len(active)), float(need), None, agg, text,
                "composite",
            )
        )  # fmt: skip


def _composite_level(
    comp: CompositeRule, firing: dict[str, Severity | None]
) -> tuple[list[Severity], Severity | None]:
    active: list[Severity] = [s for s in firing.values() if s is not None]
    ranked: list[Severity] = sorted(active, key=SEVERITY_RANK.__getitem__)
    if comp.mode == "all_of" and len(active) == len(comp.members):
        return active, comp.severity or ranked[0]
    if comp.mode == "any_of" and active:
        return active, comp.severity or ranked[-1]
    return active, None


def _matches(rule: WindowRule, dims: dict[str, str]) -> bool:
    """Whether a dimension set has the values of the rule's ``match`` (all, when it has none)."""
    return all(dims.get(k) == v for k, v in rule.match.items())


def has_open_alerts(state: State) -> bool:
    """Whether a per-dimension-set state has a firing alert (worth a periodic ``sweep``)."""
    return any(r.get("alert") for r in (state.get("rules") or {}).values())


# -- judging ------------------------------------------------------------------------------


def _judge_budget(rule: BudgetRule, agg: WindowAggregate, rst: State) -> tuple[Verdict, State | None]:
    """The verdict on the day's running total; and the previous day's budget state when
    this window opens a new UTC day (its alert, if any, ends with that day)."""
    day = (_ms(agg.window_start) // 1000) // DAY_S
    bst: State | None = rst.get("budget")
    ended: State | None = None
    if bst is None or day > int(bst["day"]):
        ended = bst
        bst = rst["budget"] = {"day": day, "total": 0.0}
    if day == int(bst["day"]):  # a window of an earlier day arriving late is not counted today
        bst["total"] = float(bst["total"]) + float(getattr(agg, rule.metric))
    total = float(bst["total"])
    evidence: dict[str, float | str] = {
        "day_total": total,
        "day": datetime.fromtimestamp(int(bst["day"]) * DAY_S, tz=UTC).strftime("%Y-%m-%d"),
    }
    if rule.critical is not None and total > rule.critical:
        return Verdict("critical", total, rule.critical, evidence=evidence), ended
    if rule.warning is not None and total > rule.warning:
        return Verdict("warning", total, rule.warning, evidence=evidence), ended
    limit = rule.warning if rule.warning is not None else rule.critical
    return Verdict(None, total, limit, evidence=evidence), ended


# -- alert building -----------------------------------------------------------------------


def _build(
    rule: str,
    metric: str,
    tr: Transition,
    value: float | None,
    threshold: float | None,
    baseline: float | None,
    agg: WindowAggregate,
    summary: str,
    rule_type: RuleType | None = None,
) -> Alert:
    return _build_at(
        rule, metric, tr, value, threshold, baseline,
        agg.dimensions, agg.window_start, agg.window_end, summary, rule_type,
    )  # fmt: skip


def _build_at(
    rule: str,
    metric: str,
    tr: Transition,
    value: float | None,
    threshold: float | None,
    baseline: float | None,
    dimensions: dict[str, str],
    window_start: datetime,
    window_end: datetime,
    summary: str,
    rule_type: RuleType | None = None,
) -> Alert:
    fp = alert_fingerprint(rule, dimensions)
    end_ms = _ms(window_end)
    alert_id = hashlib.sha1(f"{fp}|{tr.change}|{tr.severity}|{end_ms}".encode()).hexdigest()[:32]
    return Alert(
        alert_id=alert_id,
        fingerprint=fp,
        rule=rule,
        severity=tr.severity,
        state=tr.state,
        metric=metric,
        value=value,
        threshold=threshold,
        baseline=baseline,
        dimensions=dict(dimensions),
        window_start=window_start,
        window_end=window_end,
        started_at=_from_ms(tr.started_at_ms),
        ts=window_end,
        summary=summary[:4096],
        rule_type=rule_type,
    )


def _band(metric: str, v: Verdict) -> str:
    lo, hi = v.expected_low, v.expected_high
    if lo is None and hi is None:
        return ""
    return f" (expected {fmt_value(metric, lo)}..{fmt_value(metric, hi)})"


def _why(v: Verdict) -> str:
    """The evidence in the one wording alerts use everywhere (schemas/alert.py)."""
    text = evidence_text(rounded(v.evidence))
    return f" [{text}]" if text else ""


def _summary(rule: WindowRule, tr: Transition, v: Verdict, agg: WindowAggregate) -> str:
    m = rule.metric
    where = f"{fmt_dims(agg.dimensions)} {fmt_window(agg.window_s, agg.window_end)}"
    since = f"(firing since {fmt_time(_from_ms(tr.started_at_ms))})"
    value = fmt_value(m, v.value)
    if isinstance(rule, BudgetRule):
        limit = fmt_value(m, v.threshold, level=True)
        if tr.change == "resolved":
            return f"resolved: {m} {value} today within the daily budget {where} {since}"
        return f"{m} {value} today > daily budget {limit} ({tr.severity}) {where}"
    if isinstance(rule, SloRule):
        ev = v.evidence
        slo = f"success SLO {rule.objective * 100:g}% over {fmt_span(rule.period)}"
        left = float(ev.get("error_budget_remaining", 1.0)) * 100
        if tr.change == "resolved":
            return f"resolved: {slo}: error budget burn back under its alert rates {where} ({left:.0f}% of the budget left) {since}"
        return f"{slo}: {evidence_text(rounded(ev))} ({tr.severity}) {where}"
    if isinstance(rule, AnomalyRule):
        if rule.method == "seasonal":
            method = (
                "rolling 1h baseline (less than a day of history, wider bounds)"
                if v.evidence.get("history") == "rolling_fallback"
                else "seasonal baseline (same time of day and weekday)"
                if v.evidence.get("history") == "seasonal_weekly"
                else "seasonal baseline (same time of day)"
            )
        else:
            method = f"{fmt_span(rule.baseline_s)} baseline"
        base = fmt_value(m, v.baseline)
        if tr.change == "resolved":
            if v.baseline is None or v.value is None:
                return f"resolved: {m} {value} not anomalous {where} {since}"
            return f"resolved: {m} {value} back near its {method} {base} {where} {since}"
        ratio = (v.value or 0.0) / v.baseline if v.baseline else float("inf")
        op = ">" if rule.direction == "above" else "<"
        factor = rule.factor
        if (
            tr.severity == "critical"
            and rule.critical_factor is not None
            and rule.severity != "critical"
        ):
            factor = rule.critical_factor
        lim = f"{factor:g}x" if rule.direction == "above" else f"1/{factor:g}x"
        return (
            f"{m} {value} is {ratio:.2f}x its {method} {base} ({op} {lim})"
            f"{_band(m, v)}{_why(v)} ({tr.severity}) {where}"
        )
    op = ">" if rule.direction == "above" else "<"
    back = "<=" if rule.direction == "above" else ">="
    if tr.change == "resolved":
        if v.value is None:
            few = ""
            if rule.min_requests > 0:
                over = rule.pool_windows * rule.window if rule.metric in POOLED_METRICS else rule.window
                few = f": fewer than {rule.min_requests} over {fmt_span(over)}"
            return f"resolved: {m} not breaching (too little data to judge{few}) {where} {since}"
        limit = fmt_value(m, v.threshold, level=True)
        return f"resolved: {m} {value} {back} {limit} {where} {since}"
    limit = fmt_value(m, v.threshold, level=True)
    return f"{m} {value} {op} {limit}{_why(v)} ({tr.severity}) {where}"
