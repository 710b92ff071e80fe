"""Pydantic models of the rules file: thresholds, anomalies, budgets, composites.

A rules file is ``{"version": 1, "rules": [...]}``; each rule has a unique ``name`` and a
``type`` (threshold | slo | anomaly | budget | composite). Unknown keys are errors.
Durations are seconds or text such as ``90s``, ``5m``, ``24h``, ``7d``.

Comparisons are strict: a threshold ``above`` fires when the value is greater than its
level, ``below`` when it is less, so a value equal to the target meets the target. Rates,
means and percentiles must also breach with ``confidence`` (see evidence.py), so a small
sample's point value alone never fires.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from llmpulse.config.worker import CALL_DIMENSIONS
from llmpulse.schemas.alert import RuleType as RuleType  # the `type` of a rule, as alerts carry it

Kind = Literal["calls", "gpu", "feedback", "host"]
Direction = Literal["above", "below"]
Severity = Literal["warning", "critical"]
SEVERITY_RANK: dict[str, int] = {"warning": 1, "critical": 2}

CALL_METRICS = frozenset(
    {
        "requests", "errors", "qps", "error_rate", "success_rate",
        "latency_avg_ms", "latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "ttft_p95_ms",
        "prompt_tokens", "completion_tokens", "total_tokens", "cost_usd", "unpriced_requests",
        "cost_per_request", "tokens_per_request",
    }
)  # fmt: skip
FEEDBACK_METRICS = frozenset({"feedback_count", "intent_accuracy", "relevance_avg"})
GPU_METRICS = frozenset(
    {
        "samples", "gpu_util_avg_pct", "gpu_util_max_pct", "memory_used_max_bytes",
        "memory_util_avg_pct", "temperature_max_c", "power_avg_w",
    }
)  # fmt: skip
HOST_METRICS = frozenset(
    {
        "samples", "host_cpu_avg_pct", "host_cpu_max_pct", "host_memory_avg_pct", "host_memory_max_pct",
        "memory_used_max_bytes", "host_load1_avg",
    }
)  # fmt: skip
METRICS_BY_KIND: dict[str, frozenset[str]] = {
    "calls": CALL_METRICS,
    "feedback": FEEDBACK_METRICS,
    "gpu": GPU_METRICS,
    "host": HOST_METRICS,
}
DIMENSIONS_BY_KIND: dict[str, tuple[str, ...]] = {
    "calls": CALL_DIMENSIONS,
    "feedback": ("model", "app", "user"),
    "gpu": ("host", "gpu"),
    "host": ("host",),
}
# The count that `min_requests` is compared with, per kind.
VOLUME_FIELD: dict[str, str] = {"calls": "requests", "feedback": "feedback_count", "gpu": "samples", "host": "samples"}
# Sums over a window: a window without data is a zero, not a missing value.
ADDITIVE_METRICS = frozenset(
    {
        "requests", "errors", "qps", "prompt_tokens", "completion_tokens", "total_tokens",
        "cost_usd", "unpriced_requests", "feedback_count", "samples",
    }
)  # fmt: skip
BUDGET_METRICS = frozenset(
    {"total_tokens", "prompt_tokens", "completion_tokens", "cost_usd", "requests"}
)

DAY_S = 86400
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": DAY_S, None: 1}


def parse_duration(value: Any) -> Any:
    """Seconds from ``90``, ``"90s"``, ``"5m"``, ``"24h"`` or ``"7d"``; anything else is left to fail."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return int(value) if float(value).is_integer() else value
    if isinstance(value, str):
        m = _DURATION.match(value)
        if not m:
            raise ValueError(f"not a duration: {value!r} (use seconds or e.g. 90s, 5m, 24h, 7d)")
        seconds = float(m.group(1)) * _UNIT_S[m.group(2)]
        if not seconds.is_integer():
            raise ValueError(f"duration {value!r} is not a whole number of seconds")
        return int(seconds)
    return value


Duration = Annotated[int, BeforeValidator(parse_duration), Field(gt=0)]
RuleName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:\-]+$")]


class _Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: RuleName
    description: str = ""
    publish: bool = Field(
        default=True, description="publish this rule's alerts; false: it only feeds composite rules"
    )
    resolve_after: Annotated[int, Field(ge=1, le=10_000)] = Field(
        default=2, description="consecutive clear windows before a firing alert resolves"
    )

    def signature(self) -> str:
        """Hash of the whole definition (changes when anything in the rule changes)."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:12]

    def data_signature(self) -> str:
        """Hash of what the rule's accumulated state (baseline, budget) depends on."""
        return self.signature()


class _Windowed(_Rule):
    kind: Kind = "calls"
    window: Duration = Field(default=60, description="the worker window (seconds) this rule judges")
    by: tuple[str, ...] | tuple[tuple[str, ...], ...] = Field(
        default=(),
        description=(
            "the dimension set judged ([] or absent: all traffic); a list of lists judges each"
            " set separately, e.g. [[model], [app], [api_key_hash]]"
        ),
    )
    match: dict[str, str] = Field(
        default_factory=dict, description="judge only dimension sets with these values"
    )

    @field_validator("by", mode="before")
    @classmethod
    def _by_list(cls, v: Any) -> Any:
        if isinstance(v, str):
            return (v,)
        if isinstance(v, (list, tuple)) and v and all(isinstance(x, (list, tuple)) for x in v):
            return tuple(tuple([x] if isinstance(x, str) else x) for x in v)
        return v

    @model_validator(mode="after")
    def _check_dims(self) -> _Windowed:
        known = DIMENSIONS_BY_KIND[self.kind]
        sets = self.dim_sets
        for dims in sets:
            for d in dims:
                if d not in known:
                    raise ValueError(
                        f"key 'by': unknown {self.kind} dimension {d!r}; expected some of {', '.join(known)}"
                    )
            if len(set(dims)) != len(dims):
                raise ValueError("key 'by': a dimension is named twice")
        if len(set(sets)) != len(sets):
            raise ValueError("key 'by': a dimension set is named twice")
        for d in self.match:
            if any(d not in dims for dims in sets):
                raise ValueError(f"key 'match': dimension {d!r} is not in 'by' {list(self.by)}")
        return self

    @property
    def dim_sets(self) -> tuple[tuple[str, ...], ...]:
        """The dimension sets judged (sorted names), one per entry of a list of lists."""
        if self.by and all(isinstance(x, tuple) for x in self.by):
            return tuple(tuple(sorted(x)) for x in self.by)  # type: ignore[arg-type]
        return (tuple(sorted(self.by)),)  # type: ignore[arg-type]

    @property
    def dims(self) -> tuple[str, ...]:
        return self.dim_sets[0]


class _Judged(_Windowed):
    metric: str
    min_requests: Annotated[int, Field(ge=0)] = Field(
        default=0,
        description="below this many requests (feedbacks for kind feedback, samples for gpu and host) the rule does not judge",
    )
    for_: Annotated[int, Field(ge=1, le=10_000)] = Field(
        default=1, alias="for", description="consecutive breaching windows before firing"
    )
    pool_windows: Annotated[int, Field(ge=1, le=60)] = Field(
        default=5,
        description=(
            "a window with fewer than min_requests is judged on it and the windows before it"
            " (rates, means, percentiles; for anomalies, rates), going back at most this many"
            " windows until the sample holds min_requests; 1: judge every window alone"
        ),
    )

    @model_validator(mode="after")
    def _check_metric(self) -> _Judged:
        metrics = METRICS_BY_KIND[self.kind]
        if self.metric not in metrics:
            raise ValueError(
                f"key 'metric': {self.metric!r} is not a {self.kind} metric; expected one of {', '.join(sorted(metrics))}"
            )
        return self


Confidence = Annotated[float, Field(ge=0.5, lt=1)]


class ThresholdRule(_Judged):
    type: Literal["threshold"] = "threshold"
    direction: Direction = "above"
    warning: float | None = None
    critical: float | None = None
    confidence: Confidence | None = Field(
        default=0.99,
        description=(
            "a rate, mean or percentile breaches a level only when the window shows it with this"
            " confidence (one-sided); null: judge the point value"
        ),
    )
    @model_validator(mode="after")
    def _check_levels(self) -> ThresholdRule:
        if self.warning is None and self.critical is None:
            raise ValueError("a threshold needs 'warning' or 'critical' (or both)")
        if self.warning is not None and self.critical is not None:
            if self.direction == "above" and self.critical < self.warning:
                raise ValueError("'critical' must be >= 'warning' for direction above")
            if self.direction == "below" and self.critical > self.warning:
                raise ValueError("'critical' must be <= 'warning' for direction below")
        return self

    def data_signature(self) -> str:
        return "threshold"  # no accumulated data: levels can change without losing the streak


class AnomalyRule(_Judged):
    type: Literal["anomaly"] = "anomaly"
    direction: Direction = Field(
        default="above",
        description="above: value > factor x baseline; below: value < baseline / factor",
    )
    factor: Annotated[float, Field(gt=1)] = 1.5
    critical_factor: Annotated[float, Field(gt=1)] | None = Field(
        default=None, description="critical beyond this factor; without it anomalies are warnings"
    )
    severity: Severity = Field(default="warning", description="severity below critical_factor")
    method: Literal["rolling", "seasonal"] = Field(
        default="seasonal",
        description=(
            "seasonal: the same time of day on previous days (a rolling hour with wider bounds"
            " until a day of history exists); rolling: the span before the window"
        ),
    )
    baseline: Duration | None = Field(
        default=None,
        description="rolling: the span before the window (default 24h); seasonal: days of history (default 7d)",
    )
    confidence: Confidence = Field(
        default=0.99,
        description=(
            "per series and day: under usual traffic a series raises a false anomaly on fewer than"
            " 1 - confidence of days; a window must be unlikely under its baseline with"
            " p < (1 - confidence) x window / 1 day (6.9e-6 for 0.99 and 60 s windows)"
        ),
    )

    baseline_cv: Annotated[float, Field(ge=0, le=2)] = Field(
        default=0.0,
        description=(
            "counts, sums and other non-rate metrics: how far a usual day's level strays from the"
            " baseline's, as a share of it (added to the spread: (cv x expected)^2; 0: the"
            " baseline is taken as exact). One previous day, or a few, cannot show it: against a"
            " baseline taken as exact an ordinary 28 % busier afternoon read as p = 1e-7 (the"
            " shipped rules use 0.15)"
        ),
    )

    @property
    def alpha(self) -> float:
        """The per-window p-value below which a window is unlikely enough (see confidence)."""
        return (1.0 - self.confidence) * self.window / DAY_S
    bucket: Duration | None = Field(
        default=None,
        description="baseline granularity: rolling default baseline/288 (5 min for 24h); seasonal default 15m",
    )
    min_baseline_windows: Annotated[int, Field(ge=1)] = 10
    min_value: Annotated[float, Field(ge=0)] = Field(
        default=0.0, description="values below this are not judged (direction above)"
    )
    zero_fill: bool = Field(
        default=False,
        description=(
            "count windows without data as zeros in the baseline (additive metrics such as requests"
            " or cost); default: the baseline averages the windows that had data"
        ),
    )

    @model_validator(mode="after")
    def _check_anomaly(self) -> AnomalyRule:
        if self.critical_factor is not None and self.critical_factor < self.factor:
            raise ValueError("'critical_factor' must be >= 'factor'")
        b = self.bucket_s
        if b % self.window != 0:
            raise ValueError(f"'bucket' ({b} s) must be a multiple of the window ({self.window} s)")
        if self.method == "seasonal":
            if DAY_S % b != 0:
                raise ValueError(f"'bucket' ({b} s) must divide a day for the seasonal method")
            if self.baseline_s % DAY_S != 0:
                raise ValueError("'baseline' must be whole days for the seasonal method (e.g. 7d)")
        elif self.baseline_s < b:
            raise ValueError("'baseline' must be at least one 'bucket'")
        return self

    @property
    def baseline_s(self) -> int:
        if self.baseline is not None:
            return self.baseline
        return 7 * DAY_S if self.method == "seasonal" else DAY_S

    @property
    def bucket_s(self) -> int:
        if self.bucket is not None:
            return self.bucket
        if self.method == "seasonal":
            return max(900, self.window)
        per = max(self.window, self.baseline_s // 288)
        return per - per % self.window  # a multiple of the window

    @property
    def zero_filled(self) -> bool:
        return self.zero_fill and self.metric in ADDITIVE_METRICS

    def data_signature(self) -> str:
        key = [2, self.kind, self.metric, self.window, self.method, self.baseline_s, self.bucket_s]
        return hashlib.sha1(json.dumps(key).encode()).hexdigest()[:12]


class BurnAlert(BaseModel):
    """One long/short window pair of a multiwindow burn-rate alert (Google SRE workbook)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    long: Duration
    short: Duration
    burn_rate: Annotated[float, Field(gt=0)]
    severity: Severity = "critical"

    @model_validator(mode="after")
    def _check_pair(self) -> BurnAlert:
        if self.short >= self.long:
            raise ValueError("'short' must be shorter than 'long'")
        return self


DEFAULT_BURN_ALERTS = (
    BurnAlert(long=3600, short=300, burn_rate=14.4, severity="critical"),
    BurnAlert(long=6 * 3600, short=1800, burn_rate=6, severity="warning"),
)


class SloRule(_Windowed):
    """An objective on the share of good calls, alerted on error-budget burn rate.

    Fires a pair when both its long and short window burn the budget faster than
    ``burn_rate`` (1 = the budget lasts exactly the period). Good calls are the
    successful ones (``requests - errors``).
    """

    type: Literal["slo"] = "slo"
    kind: Literal["calls"] = "calls"
    objective: Annotated[float, Field(gt=0, lt=1)] = Field(
        description="the share of calls that must succeed over the period, e.g. 0.99"
    )
    period: Duration = Field(default=30 * DAY_S, description="the SLO period (whole days)")
    alerts: tuple[BurnAlert, ...] = Field(
        default=DEFAULT_BURN_ALERTS, min_length=1, description="long/short window pairs"
    )
    min_requests: Annotated[int, Field(ge=0)] = Field(
        default=0, description="a pair is not judged with fewer calls than this in its long window"
    )

    @model_validator(mode="after")
    def _check_slo(self) -> SloRule:
        if self.period % DAY_S != 0:
            raise ValueError("'period' must be whole days (e.g. 28d, 30d)")
        for a in self.alerts:
            for key, span in (("long", a.long), ("short", a.short)):
                if span % self.window != 0:
                    raise ValueError(
                        f"key 'alerts': '{key}' ({span} s) must be a multiple of the window ({self.window} s)"
                    )
            if a.long > self.period:
                raise ValueError("key 'alerts': 'long' must not exceed the period")
        return self

    @property
    def metric(self) -> str:
        return "burn_rate"

    @property
    def spans_s(self) -> tuple[int, ...]:
        """Every window span the rule sums over, longest first."""
        return tuple(sorted({s for a in self.alerts for s in (a.long, a.short)}, reverse=True))

    def data_signature(self) -> str:
        key = ["slo", 1, self.kind, self.window, self.spans_s, self.period]
        return hashlib.sha1(json.dumps(key).encode()).hexdigest()[:12]


class BudgetRule(_Windowed):
    """A running total per UTC day of an additive calls metric, per dimension set."""

    type: Literal["budget"] = "budget"
    kind: Literal["calls"] = "calls"
    metric: str = "total_tokens"
    warning: Annotated[float, Field(ge=0)] | None = None
    critical: Annotated[float, Field(ge=0)] | None = None

    @model_validator(mode="after")
    def _check_budget(self) -> BudgetRule:
        if self.metric not in BUDGET_METRICS:
            raise ValueError(
                f"key 'metric': {self.metric!r} cannot be budgeted; expected one of {', '.join(sorted(BUDGET_METRICS))}"
            )
        if self.warning is None and self.critical is None:
            raise ValueError("a budget needs 'warning' or 'critical' (or both)")
        if self.warning is not None and self.critical is not None and self.critical < self.warning:
            raise ValueError("'critical' must be >= 'warning'")
        return self

    def data_signature(self) -> str:
        key = [self.kind, self.metric, self.window]
        return hashlib.sha1(json.dumps(key).encode()).hexdigest()[:12]


class CompositeRule(_Rule):
    """Fires while all (all_of) or any (any_of) of other rules fire for the same dimension set."""

    type: Literal["composite"] = "composite"
    all_of: tuple[RuleName, ...] | None = None
    any_of: tuple[RuleName, ...] | None = None
    severity: Severity | None = Field(
        default=None,
        description="fixed severity; default: the lowest of the members (all_of) or the highest (any_of)",
    )

    @model_validator(mode="after")
    def _one_list(self) -> CompositeRule:
        if (self.all_of is None) == (self.any_of is None):
            raise ValueError("a composite needs exactly one of 'all_of' or 'any_of'")
        if not self.members:
            raise ValueError("a composite needs at least one member rule")
        if self.name in self.members:
            raise ValueError("a composite cannot name itself")
        return self

    @property
    def members(self) -> tuple[str, ...]:
        return self.all_of if self.all_of is not None else (self.any_of or ())

    @property
    def mode(self) -> Literal["all_of", "any_of"]:
        return "all_of" if self.all_of is not None else "any_of"


JudgedRule = ThresholdRule | AnomalyRule
WindowRule = ThresholdRule | SloRule | AnomalyRule | BudgetRule
Rule = ThresholdRule | SloRule | AnomalyRule | BudgetRule | CompositeRule
RULE_MODELS: dict[str, type[_Rule]] = {
    "threshold": ThresholdRule,
    "slo": SloRule,
    "anomaly": AnomalyRule,
    "budget": BudgetRule,
    "composite": CompositeRule,
}


def _show(sets: tuple[tuple[str, ...], ...]) -> str:
    return str(list(sets[0])) if len(sets) == 1 else str([list(x) for x in sets])


class RuleSet(BaseModel):
    """A validated set of rules: unique names, composites that name existing rules."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = 1
    rules: tuple[Rule, ...] = ()
    source: str = Field(default="", exclude=True, description="where the rules came from")

    @model_validator(mode="after")
    def _check_set(self) -> RuleSet:
        by_name: dict[str, Rule] = {}
        for r in self.rules:
            if r.name in by_name:
                raise ValueError(f"rule {r.name!r}: the name is used twice")
            by_name[r.name] = r
        for r in self.rules:
            if not isinstance(r, CompositeRule):
                continue
            dims: tuple[tuple[str, ...], ...] | None = None
            first: tuple[str, int] = ("", 0)
            for m in r.members:
                member = by_name.get(m)
                if member is None:
                    raise ValueError(f"rule {r.name!r}: key '{r.mode}': no rule named {m!r}")
                if isinstance(member, CompositeRule):
                    raise ValueError(
                        f"rule {r.name!r}: key '{r.mode}': {m!r} is a composite; name plain rules"
                    )
                where = (member.kind, member.window)
                sets = member.dim_sets
                if dims is None:
                    dims, first = sets, where
                elif sets != dims:
                    raise ValueError(
                        f"rule {r.name!r}: key '{r.mode}': members judge different dimension sets "
                        f"({_show(dims)} and {_show(sets)}); a composite needs the same 'by'"
                    )
                elif where != first:
                    raise ValueError(
                        f"rule {r.name!r}: key '{r.mode}': members judge different windows "
                        f"({first[0]} {first[1]} s and {where[0]} {where[1]} s); a composite "
                        "needs members of the same kind and window"
                    )
        return self

    def by_name(self) -> dict[str, Rule]:
        return {r.name: r for r in self.rules}

    def windows(self) -> set[int]:
        return {r.window for r in self.rules if not isinstance(r, CompositeRule)}
