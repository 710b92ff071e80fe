"""The labelled workload of the detection benchmark: days of ordinary LLM traffic with
incidents whose kind, start, end and target (the dimension at fault) are known.

Deterministic for a seed: the same seed gives the same incidents and the same calls, so
a score can be reproduced and rules compared on equal terms; another seed moves the
incidents (times, kinds, targets) and redraws the noise, so rules are judged on traffic
they were not tuned on.

Ordinary traffic (what must NOT alert):
- the apps, models, API keys and users of the demo traffic (llmpulse/producers/loadgen.py:
  4 apps, 8 models of 4 providers, 12 keys, ~140 users), each app with its model mix;
- a daily curve (loadgen's `daily_rhythm`: 0.3 at night, 1.0 mid-afternoon UTC, so busy
  hours bring ~3x the quiet ones), times `rate_per_s` (default 4 calls/s at the peak,
  ~2.4 on average); Poisson arrivals, a day-to-day (+-5%) and hour-to-hour (+-5%) wobble
  of the rate, lognormal token counts and latencies;
- background errors: 0.3% of calls (503 overloaded or 429 rate limited);
- every model's average latency below the shipped 2 s target (its typical latency times
  0.6 + 0.4 x tokens / usual tokens, times lognormal noise);
- one GPU host with 2 GPUs sampled every 15 s, busy 25-70% along the daily curve.

Incidents (what MUST alert, each on one target; 10-20 minutes each by default):
    error_burst     model         30-60% of the model's calls fail (500 / 429)
    latency_spike   model         calls take 3-6x as long (more on fast models: at least
                                  ~3 s on average)
    token_spike     app           the app's prompts 4x, answers 8x as long
    abusive_key     api_key_hash  one existing key adds 150-300 calls a minute
    cost_spike      model         prompts 4x and answers 6x as long on one of the models
                                  where that costs money (>= $0.003 per 1k+1k tokens)
    gpu_saturation  gpu           one GPU pinned at 96-99%
Budget crossings (what MUST alert, once): the running total of each UTC day per budget
rule of the rules file (the shipped `daily_tokens`: 80k tokens warning, 100k critical,
passed early every day by this traffic) is kept as the calls are made, so the workload
knows the call that takes each day's total past each level (`BudgetLedger`).

Incidents are spread over the span after a warm-up (one per slot of span / n, at a
random time in it, 15 minutes apart at least); one is moved into the afternoon peak
(13:30-16:00 UTC) when the span covers one; every kind appears once before any repeats.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

import msgspec

from llmpulse.producers.keyhash import KeyHasher
from llmpulse.producers.loadgen import APPS, MODELS, AppProfile, daily_rhythm, weighted_choice
from llmpulse.producers.pricing import price_call
from llmpulse.schemas.fast import CallEventFast
from llmpulse.streams.rules.model import DAY_S, BudgetRule

Kind = Literal[
    "error_burst", "latency_spike", "token_spike", "abusive_key", "cost_spike", "gpu_saturation"
]
KINDS: tuple[Kind, ...] = (
    "error_burst", "latency_spike", "token_spike", "abusive_key", "cost_spike", "gpu_saturation",
)  # fmt: skip
DIMENSION_OF: dict[Kind, str] = {
    "error_burst": "model", "latency_spike": "model", "token_spike": "app",
    "abusive_key": "api_key_hash", "cost_spike": "model", "gpu_saturation": "gpu",
}  # fmt: skip

GPU_HOST = "gpu-node-1"
GPUS = 2
GPU_INTERVAL_S = 15.0
BACKGROUND_ERROR_SHARE = 0.003
PEAK_HOURS = (13.5, 16.0)  # UTC, where daily_rhythm is near 1.0
MIN_GAP_S = 900.0  # between the end of one incident and the start of the next
# the keys are hashed as the proxy and SDK hash them (a keyed hash); a fixed bench secret
# keeps the hashes, and so the labels, the same on every run
HASHER = KeyHasher(b"llmpulse-detection-bench-secret-0001")


@dataclass(frozen=True, slots=True)
class Incident:
    """One labelled incident: its kind, its span [start, end) and the dimension at fault."""

    n: int
    kind: Kind
    start: datetime
    end: datetime
    dimension: str  # model | app | api_key_hash | gpu
    value: str  # the model, app, hashed key or GPU index at fault
    factor: float
    about: str  # for people: the key's app and number (its hash says nothing)

    def describe(self) -> str:
        return f"#{self.n} {self.kind} on {self.dimension}={self.about} {self.start:%d %H:%M}-{self.end:%H:%M}"


@dataclass(frozen=True, slots=True)
class Workload:
    start: datetime
    span_s: float
    seed: int
    rate_per_s: float
    incidents: tuple[Incident, ...]

    @property
    def end(self) -> datetime:
        return self.start + timedelta(seconds=self.span_s)

    def active(self, kind: Kind, ts: datetime) -> Incident | None:
        for inc in self.incidents:
            if inc.kind == kind and inc.start <= ts < inc.end:
                return inc
        return None


def _key_of(app: AppProfile, i: int) -> str:
    return app.keys[i % len(app.keys)]


def _costly(model: str) -> bool:
    return (price_call(model, 1000, 1000) or 0.0) >= 0.003


def plan(
    seed: int,
    start: datetime,
    span_s: float,
    incidents: int = 12,
    rate_per_s: float = 4.0,
    duration_s: tuple[float, float] = (600.0, 1200.0),
) -> Workload:
    """The incident schedule of a workload (its calls come from `calls()`)."""
    rng = random.Random(f"incidents/{seed}")
    warmup = min(3 * 3600.0, max(1200.0, 0.1 * span_s))
    tail = duration_s[1] + 600.0
    slot = (span_s - warmup - tail) / max(1, incidents)
    if slot < duration_s[1] + MIN_GAP_S:
        raise SystemExit(
            f"{incidents} incidents do not fit in {span_s / 3600:.1f} h with {warmup / 60:.0f} min of warm-up "
            f"(each needs {(duration_s[1] + MIN_GAP_S) / 60:.0f} min): fewer --incidents or more --days"
        )
    kinds: list[Kind] = []
    while len(kinds) < incidents:
        block = list(KINDS)
        rng.shuffle(block)
        kinds += block
    offsets: list[float] = []
    durations: list[float] = []
    for i in range(incidents):
        dur = round(rng.uniform(*duration_s) / 60) * 60
        lo = warmup + i * slot
        offsets.append(lo + rng.uniform(0, max(0.0, slot - dur - MIN_GAP_S)))
        durations.append(dur)
    # one incident at the afternoon peak: the slot whose room overlaps a day's peak hours
    at_peak = [i for i, off in enumerate(offsets) if _at_peak(start + timedelta(seconds=off))]
    if not at_peak:
        candidates = []
        for i in range(incidents):
            lo, hi = warmup + i * slot, warmup + (i + 1) * slot - durations[i] - MIN_GAP_S
            t = _first_peak_in(start, lo, hi)
            if t is not None:
                candidates.append((i, t))
        if candidates:
            i, t = rng.choice(candidates)
            offsets[i] = t
    out = []
    for i, (kind, off, dur) in enumerate(zip(kinds[:incidents], offsets, durations, strict=True)):
        t0 = start + timedelta(seconds=round(off))
        t1 = t0 + timedelta(seconds=dur)
        if kind in ("error_burst", "latency_spike", "cost_spike"):
            pool = [
                m.model
                for m in MODELS.values()
                if m.operation != "embedding" or kind == "error_burst"
            ]
            if kind == "cost_spike":
                pool = [m for m in pool if _costly(m)]
            value = about = rng.choice(sorted(pool))
            factor = {
                "error_burst": rng.uniform(0.3, 0.6),
                "latency_spike": rng.uniform(3, 6),
                "cost_spike": 6.0,
            }[kind]
            if kind == "latency_spike":  # slow enough to matter: ~3 s or more on average
                factor *= max(1.0, 1000.0 / MODELS[value].latency_ms)
        elif kind == "token_spike":
            value = about = rng.choice([a.name for a in APPS])
            factor = 8.0
        elif kind == "abusive_key":
            app = rng.choice(APPS)
            k = rng.randrange(len(app.keys))
            value, about = HASHER.hash(_key_of(app, k)), f"{app.name} key {k}"
            factor = rng.uniform(150, 300)  # extra calls a minute
        else:
            value = about = str(rng.randrange(GPUS))
            factor = rng.uniform(96, 99)
        out.append(
            Incident(i + 1, kind, t0, t1, DIMENSION_OF[kind], value, round(factor, 2), about)
        )
    return Workload(start, span_s, seed, rate_per_s, tuple(out))


def _at_peak(ts: datetime) -> bool:
    hour = ts.hour + ts.minute / 60
    return PEAK_HOURS[0] <= hour < PEAK_HOURS[1]


def _first_peak_in(start: datetime, lo: float, hi: float) -> float | None:
    """The first offset in [lo, hi] whose time of day is in the peak hours."""
    t = lo
    while t <= hi:
        if _at_peak(start + timedelta(seconds=t)):
            return t
        t += 300.0
    return None


# -- budgets --------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class BudgetCrossing:
    """A day's running total passing a budget rule's level: a labelled, expected alert."""

    rule: str
    severity: Literal["warning", "critical"]
    level: float
    dimensions: tuple[tuple[str, str], ...]
    at: datetime  # the call that took the day's total past the level
    window_s: int  # the rule's window: the alert is due for the window holding `at`

    def describe(self) -> str:
        dims = ",".join(f"{k}={v}" for k, v in self.dimensions) or "all traffic"
        return f"{self.rule} {self.severity} ({self.level:g}) on {dims} at {self.at:%d %H:%M:%S}"


class BudgetLedger:
    """The running total of each UTC day per budget rule and dimension set, as the engine
    keeps it (strictly greater than a level breaches it), and when each level was passed."""

    def __init__(self, budgets: Sequence[BudgetRule]) -> None:
        self.budgets = tuple(budgets)
        self.totals: dict[tuple[str, tuple[tuple[str, str], ...], int], float] = {}
        self.crossings: list[BudgetCrossing] = []

    def add(self, ev: CallEventFast) -> None:
        day = int(ev.ts.timestamp() // DAY_S)
        for rule in self.budgets:
            if any(getattr(ev, k, None) != v for k, v in rule.match.items()):
                continue
            amount = float(getattr(ev, rule.metric, None) or (1 if rule.metric == "requests" else 0))
            for names in rule.dim_sets:
                dims = tuple((n, str(getattr(ev, n))) for n in names)
                if any(v == "None" for _, v in dims):
                    continue
                key = (rule.name, dims, day)
                before = self.totals.get(key, 0.0)
                after = self.totals[key] = before + amount
                levels = (("warning", rule.warning), ("critical", rule.critical))
                for severity, level in levels:
                    if level is not None and before <= level < after:
                        self.crossings.append(
                            BudgetCrossing(rule.name, severity, level, dims, ev.ts, rule.window)  # type: ignore[arg-type]
                        )


# -- the calls ------------------------------------------------------------------------------------
class Traffic:
    """The calls and GPU samples of a workload, in event-time order, as wire events."""

    def __init__(self, w: Workload, budgets: Sequence[BudgetRule] = ()) -> None:
        self.w = w
        self.ledger = BudgetLedger(budgets)
        self.rng = random.Random(f"traffic/{w.seed}")
        days = math.ceil(w.span_s / 86400) + 1
        self.day_wobble = [self.rng.gauss(1.0, 0.05) for _ in range(days)]
        self.hour_wobble = [self.rng.gauss(1.0, 0.05) for _ in range(days * 24)]
        self.app_weights = tuple((a.name, a.weight) for a in APPS)
        self.apps = {a.name: a for a in APPS}
        self.seq = 0
        self.counts: dict[str, int] = {
            "calls": 0,
            "background_errors": 0,
            "gpu_samples": 0,
            "incident_calls": 0,
        }
        # calls per minute (epoch seconds of its start): what each 60 s window must hold, so a
        # replay can tell a window short of events (dead-lettered late, lost) from a judging change
        self.per_minute: dict[int, int] = {}

    def _poisson(self, lam: float) -> int:
        if lam <= 0:
            return 0
        limit, k, p = math.exp(-lam), 0, 1.0
        while True:
            p *= self.rng.random()
            if p <= limit:
                return k
            k += 1

    def _pick(self, options: tuple[tuple[str, float], ...]) -> str:
        return weighted_choice(self.rng, options)

    def events(self) -> Iterator[tuple[str, str, CallEventFast | dict[str, object]]]:
        """(topic kind, key, event) in event-time order: "calls" events and "gpu" samples."""
        w = self.w
        next_gpu = 0.0
        second = 0
        while second < w.span_s:
            ts0 = w.start + timedelta(seconds=second)
            while next_gpu < second + 1 and next_gpu < w.span_s:
                yield from self._gpu(w.start + timedelta(seconds=next_gpu))
                next_gpu += GPU_INTERVAL_S
            hour = int(second // 3600)
            rate = (
                w.rate_per_s
                * daily_rhythm(ts0)
                * self.day_wobble[hour // 24]
                * self.hour_wobble[hour]
            )
            calls = [
                self._call(ts0 + timedelta(seconds=self.rng.random()))
                for _ in range(self._poisson(rate))
            ]
            abuse = w.active("abusive_key", ts0)
            if abuse is not None:
                for _ in range(self._poisson(abuse.factor / 60.0)):
                    calls.append(self._call(ts0 + timedelta(seconds=self.rng.random()), abuse))
            calls.sort(key=lambda e: e.ts)
            minute = int(ts0.timestamp()) // 60 * 60
            self.per_minute[minute] = self.per_minute.get(minute, 0) + len(calls)
            for e in calls:
                self.ledger.add(e)
                yield "calls", e.model, e
            second += 1

    def _call(self, ts: datetime, abuse: Incident | None = None) -> CallEventFast:
        rng = self.rng
        if abuse is not None:
            app = next(a for a in APPS if abuse.about.startswith(a.name + " "))
            model = MODELS[app.models[0][0]]
            key_hash = abuse.value
            user = f"{app.name}-scraper"
        else:
            app = self.apps[self._pick(self.app_weights)]
            model = MODELS[self._pick(app.models)]
            key_hash = HASHER.hash(rng.choice(app.keys))
            user = f"{app.name}-user-{int(rng.paretovariate(1.2)) % app.users:03d}"
        incident: Incident | None = abuse
        prompt = max(1, int(rng.lognormvariate(math.log(app.prompt_tokens), 0.5)))
        completion = max(1, int(rng.lognormvariate(math.log(app.completion_tokens), 0.5)))
        tokens = self.w.active("token_spike", ts)
        if tokens is not None and tokens.value == app.name:
            prompt, completion, incident = prompt * 4, int(completion * tokens.factor), tokens
        cost = self.w.active("cost_spike", ts)
        if cost is not None and cost.value == model.model:
            prompt, completion, incident = prompt * 4, int(completion * cost.factor), cost
        if model.operation == "embedding":
            completion = 0
        streamed = model.operation != "embedding" and rng.random() < app.stream_share
        usual = max(1, app.completion_tokens)
        latency = (
            model.latency_ms
            * (0.6 + 0.4 * min(completion, 20 * usual) / usual)
            * rng.lognormvariate(0, 0.3)
        )
        slow = self.w.active("latency_spike", ts)
        if slow is not None and slow.value == model.model:
            latency *= slow.factor
            incident = slow
        ttft: float | None = latency * rng.uniform(0.12, 0.3) if streamed else None
        status, error = 200, None
        burst = self.w.active("error_burst", ts)
        if burst is not None and burst.value == model.model and rng.random() < burst.factor:
            status, error = (
                (500, "server_error") if rng.random() < 0.7 else (429, "rate_limit_exceeded")
            )
            incident = burst
        elif rng.random() < BACKGROUND_ERROR_SHARE:
            status, error = (
                (503, "overloaded") if rng.random() < 0.5 else (429, "rate_limit_exceeded")
            )
        if error is not None:
            completion, ttft = 0, None
            latency = min(latency, rng.uniform(40, 400))
        self.seq += 1
        self.counts["calls"] += 1
        self.counts["background_errors"] += error is not None and incident is None
        self.counts["incident_calls"] += incident is not None
        return CallEventFast(
            event_id=f"det{self.w.seed}-{self.seq:09d}", ts=ts, source="sdk", provider=model.provider,
            model=model.model, response_model=None if error else model.model, operation=model.operation,
            app=app.name, user=user, api_key_hash=key_hash, status_code=status, error_type=error,
            latency_ms=round(latency, 1), ttft_ms=None if ttft is None else round(ttft, 1), streamed=streamed,
            prompt_tokens=prompt, completion_tokens=completion,
            cost_usd=price_call(model.model, prompt, completion),
        )  # fmt: skip

    def _gpu(self, ts: datetime) -> Iterator[tuple[str, str, dict[str, object]]]:
        hot = self.w.active("gpu_saturation", ts)
        for g in range(GPUS):
            if hot is not None and hot.value == str(g):
                util = min(100.0, self.rng.gauss(hot.factor, 0.8))
            else:
                util = min(
                    100.0, max(0.0, 25 + 45 * (daily_rhythm(ts) - 0.3) / 0.7 + self.rng.gauss(0, 5))
                )
            self.counts["gpu_samples"] += 1
            yield "gpu", GPU_HOST, {
                "event_id": f"det{self.w.seed}-gpu{g}-{int(ts.timestamp())}", "ts": ts, "host": GPU_HOST,
                "gpu_index": g, "name": "NVIDIA A100-SXM4-80GB", "utilization_gpu_pct": round(util, 1),
                "utilization_memory_pct": round(util * 0.6, 1), "memory_used_bytes": int(util / 100 * 80e9),
                "memory_total_bytes": 80_000_000_000,
            }  # fmt: skip


_enc = msgspec.json.Encoder()


def encode(event: CallEventFast | dict[str, object]) -> bytes:
    """One event, one message, as a user's producer sends it (the wire JSON, without nulls)."""
    if isinstance(event, CallEventFast):
        return _enc.encode(
            {k: v for k, v in msgspec.structs.asdict(event).items() if v is not None}
        )
    return _enc.encode(event)


def day_start(days: float, start_hour: float, now: datetime | None = None) -> datetime:
    """A start in the past such that the whole span ends before now (whole UTC days back)."""
    now = now or datetime.now(UTC)
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    back = math.ceil(days + start_hour / 24) + 1
    return today - timedelta(days=back) + timedelta(hours=start_hour)
