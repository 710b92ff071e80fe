"""Detection benchmark: do the rules catch labelled incidents, name what is at fault, and
stay quiet otherwise? Issue 14, part 7.

    python bench/run.py detection [--days 3] [--seed 1] [--incidents 12] [--rules FILE]
                                  [--rate 4.0] [--start-hour 0] [--window-s 60] [--offline]

`--offline` judges the same workload in this process (the worker's accumulators, dimension
sets, rules runtime and root-cause step; no broker, no worker; seconds): the reference a
replay of the seed must match when it loses no event, and a quick loop to try rules. Its
results say "mode": "offline"; only a replay measures the product.

A short check (6 hours around the afternoon peak, 6 incidents, one of each kind; 82k
events, 3 to 9 minutes on the shared 2-core machine, replayed at 160-440 events/s while
the worker is slow on sparse traffic, issue 15; the 3-day default is ~620k events):

    python bench/run.py detection --days 0.25 --start-hour 11 --incidents 6

What it does: writes its own labelled workload (bench/detection_workload.py: days of
ordinary traffic on a daily curve with noise and background errors, plus incidents of
6 kinds on one model, app, API key or GPU each; `--seed` moves the incidents' times,
kinds and targets and redraws the noise), and replays it in event time through the real
worker: one event per Kafka message (as a user's own producer sends them) to a real
embedded Tansu broker, `llmpulse worker` with the shipped rules (llmpulse/defaults/
rules.yaml) or `--rules FILE`, the worker's default config otherwise. It reads every
alert from the alerts topic and scores them against the labels. No sink or notifier
runs: what the notifier would send is computed from the alert stream with the notifier's
own grouping (llmpulse/sinks/notifier/grouping.py's Dispatcher and the default `notify`
routes), its clock driven by event time (an alert "arrives" at its window's end), so
group_wait, group_interval and repeat_interval count simulated seconds.

Keys of bench/results/detection.json (W = `--window-s`, the rules' window, 60 s):
  recall                      share of incidents with a firing alert that names the
                              dimension at fault (the alert's dimensions hold it, or its
                              root_cause does) within 2 windows of the incident's start:
                              the alert's window overlaps the incident and is at the
                              latest the second whole window of it (ends at most 2 W after
                              the start rounded up to W: an incident starting at 04:59:59
                              has 1 s of its first window, not a window of data; starting
                              on a boundary this is "alerted within 0-120 s")
  recall_start_plus_2w        the same with the deadline at the start + 2 W exactly (the
                              stricter reading, for comparison)
  recall_<kind>               the same per incident kind
  incidents, incidents_<kind>, incidents_at_peak (starting 13:30-16:00 UTC)
  missed                      the incidents not recalled ("#n kind on dim=value ...")
  detect_p50_s, detect_max_s  over recalled incidents: the first naming alert's
                              window_end minus the incident's start (event time)
  false_alerts                firing alert episodes (fingerprint + started_at; an
                              escalation is the same episode) that started outside every
                              incident: before its start floored to W, or at/after its
                              end rounded up to W plus 2 W (the tolerance for rules that
                              need a window or two to clear), and are not the alert of a
                              budget crossing (below); a budget alert at any other time
                              is a false alert like any other
  false_alerts_per_day        false_alerts / days
  false_alerts_<rule>         false_alerts by rule
  notifications               new messages the notifier would send (an incident's page,
                              its resolution, reminders, and escalations where there is no
                              page to edit), all receivers of the default route; updates
                              are not counted here (a person is paged once per message)
  notifications_per_incident  such messages holding an alert that started within an
                              incident (its span as above), summed over incidents / incidents
  notification_updates        updates: edits of an incident's page after it went out (an
                              escalation, an alert joining, one of several resolving; Slack
                              chat.update plus a thread reply, a webhook POST marked update).
                              The default route's log receiver, like a Slack bot token or
                              the webhook, can edit; a Slack incoming webhook cannot, and
                              there an escalation is a new message
  updates_per_incident        updates attributed to incidents as above / incidents
  notifications_outside_incidents_per_day   the rest (new messages only), per simulated
                              day, less the budget notifications (below)
  budget_crossings            expected alerts: a UTC day's running total passing a level
                              of a budget rule (the shipped daily_tokens: 80k warning,
                              100k critical), known to the workload (BudgetLedger)
  budget_alerts_on_time       crossings with a firing alert of that rule and dimension
                              set, at the level's severity or higher, for the window of
                              the crossing call or the next one
  budget_missed               the crossings without one
  budget_notifications        new messages holding only such alerts (their firing, and
                              resolution at the day's end; the escalation to critical is an
                              update of the budget's page), and per day
  incidents_without_notification            incidents no message told anyone about
                              (e.g. an alert that joined another open incident's group)
  alerts_firing, alerts_resolved            alert events read from the alerts topic
  dead_letters_late, dead_letters_invalid, late_by_model   what the worker dead-lettered
  windows_short, calls_missing_from_windows, windows_short_first   all-traffic windows
                              (W = 60) whose first published aggregate, the one the rules
                              judged, held fewer calls than the workload made (events lost
                              to the windows: late, closed early); two runs of a seed judge
                              the same windows only when both have 0
  windows_republished         windows published again (revision > 1: partials that came
                              after the window was final; the rules do not judge them again)
  events, calls, gpu_samples, background_errors, days, seed, rate_per_s_peak, rules
  wall_s                      from the first event produced to the last window closed
  events_per_s                events / wall_s (the worker's replay speed)
  calibration_ms, load_average_1m           this machine's speed (bench/common.py)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from common import broker, calibration, make_config, start, stop, topic_reader
from confluent_kafka import Producer
from detection_workload import (
    GPU_HOST,
    GPUS,
    KINDS,
    BudgetCrossing,
    Incident,
    Traffic,
    Workload,
    day_start,
    encode,
    plan,
)

from llmpulse.config import Settings, load_settings
from llmpulse.config.notify import NotifyConfig
from llmpulse.kafka.clients import produce_all
from llmpulse.schemas.aggregate import dimensions_key
from llmpulse.schemas.alert import Alert, alert_fingerprint
from llmpulse.schemas.base import SCHEMA_VERSION
from llmpulse.schemas.gpu import GpuSample
from llmpulse.sinks.notifier.grouping import Dispatcher, Notification
from llmpulse.sinks.notifier.routing import Router
from llmpulse.sinks.notifier.silences import SilenceStore
from llmpulse.streams.accumulators import ACCUMULATORS
from llmpulse.streams.rules import load_rules
from llmpulse.streams.rules.engine import has_open_alerts
from llmpulse.streams.rules.hook import RulesRuntime
from llmpulse.streams.rules.model import BudgetRule, CompositeRule
from llmpulse.streams.rules.rootcause import explain_window

DAY_S = 86400.0


# -- scoring (pure: incidents and alerts in, figures out) --------------------------------------
def _floor(ts: datetime, w: int) -> float:
    return math.floor(ts.timestamp() / w) * w


def _ceil(ts: datetime, w: int) -> float:
    return math.ceil(ts.timestamp() / w) * w


def zone(inc: Incident, w: int, after_windows: int = 2) -> tuple[float, float]:
    """[from, to) in epoch seconds: the alerts an incident can account for start in here."""
    return _floor(inc.start, w), _ceil(inc.end, w) + after_windows * w


def names_fault(alert: Alert, inc: Incident) -> bool:
    """The alert names the incident's dimension at fault: in its dimensions, or its root cause."""
    if alert.dimensions.get(inc.dimension) == inc.value:
        return inc.dimension != "gpu" or alert.dimensions.get("host", GPU_HOST) == GPU_HOST
    rc = alert.root_cause or {}
    return rc.get("dimension") == inc.dimension and str(rc.get("value")) == inc.value


@dataclass
class IncidentScore:
    incident: Incident
    recalled: bool = False
    recalled_start_plus_2w: bool = False
    detect_s: float | None = None  # first naming alert, any time during the incident
    first_rule: str = ""
    any_alert: bool = False  # some alert started within the incident's zone
    notifications: int = 0
    updates: int = 0


@dataclass
class Score:
    incidents: list[IncidentScore]
    false_by_rule: Counter[str] = field(default_factory=Counter)
    notifications: int = 0
    updates: int = 0
    notifications_outside: int = 0
    budget_crossings: int = 0
    budget_on_time: int = 0
    budget_missed: list[str] = field(default_factory=list)
    budget_episodes: set[tuple[str, datetime]] = field(default_factory=set)
    budget_notifications: int = 0


_RANK = {"warning": 1, "critical": 2}


def score_budgets(crossings: Iterable[BudgetCrossing], alerts: list[Alert], data_end: datetime, out: Score) -> None:
    """Each crossing is due an alert of its rule and dimension set, at its severity or higher,
    for the window of the crossing call or the next one; those alerts' episodes are expected."""
    firing = [a for a in alerts if a.state == "firing" and a.window_start < data_end]
    for c in crossings:
        if c.at >= data_end:
            continue
        out.budget_crossings += 1
        fp = alert_fingerprint(c.rule, dict(c.dimensions))
        ws = math.floor(c.at.timestamp() / c.window_s) * c.window_s
        due = [
            a for a in firing
            if a.fingerprint == fp and _RANK[a.severity] >= _RANK[c.severity]
            and ws <= a.window_start.timestamp() <= ws + c.window_s
        ]  # fmt: skip
        if due:
            out.budget_on_time += 1
            out.budget_episodes.update((a.fingerprint, a.started_at) for a in due)
        else:
            out.budget_missed.append(c.describe())


def score(
    incidents: Iterable[Incident],
    alerts: list[Alert],
    w: int,
    data_end: datetime,
    crossings: Iterable[BudgetCrossing] = (),
) -> Score:
    scores = [IncidentScore(i) for i in incidents]
    zones = [zone(s.incident, w) for s in scores]
    out = Score(scores)
    score_budgets(crossings, alerts, data_end, out)
    firing = [
        a for a in alerts
        if a.state == "firing" and a.window_start < data_end
        and (a.fingerprint, a.started_at) not in out.budget_episodes
    ]  # fmt: skip
    for s in scores:
        inc = s.incident
        # the second whole window of the incident ends 2 W after its start rounded up to W
        deadline = _ceil(inc.start, w) + 2 * w
        strict = inc.start.timestamp() + 2 * w
        lo, hi = zone(inc, w)
        for a in sorted(firing, key=lambda a: (a.window_end, a.ts)):
            if lo <= a.started_at.timestamp() < hi:
                s.any_alert = True
            if a.window_start >= inc.end or a.window_end <= inc.start or not names_fault(a, inc):
                continue
            if s.detect_s is None:
                s.detect_s = (a.window_end - inc.start).total_seconds()
                s.first_rule = a.rule
            if a.window_end.timestamp() <= strict:
                s.recalled_start_plus_2w = True
            if a.window_end.timestamp() <= deadline:
                s.recalled = True
                break
    episodes: set[tuple[str, datetime]] = set()
    for a in firing:
        t = a.started_at.timestamp()
        if any(lo <= t < hi for lo, hi in zones) or (a.fingerprint, a.started_at) in episodes:
            continue
        episodes.add((a.fingerprint, a.started_at))
        out.false_by_rule[a.rule] += 1
    return out


# -- what the notifier would send ---------------------------------------------------------------
class EventClock:
    """The Dispatcher's monotonic and wall clocks, both set to the replay's event time."""

    def __init__(self) -> None:
        self.t = 0.0

    def mono(self) -> float:
        return self.t

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.t, UTC)


def notifications(alerts: list[Alert], notify: NotifyConfig, until: datetime) -> list[Notification]:
    """The messages the notifier's grouping sends for this alert stream, in event time: each
    alert arrives at its window's end; groups flush when their group_wait/interval is due.
    Every message is taken by a receiver that can edit what it posted (the default route's
    log receiver, as a Slack bot token or the webhook): the handle it answers goes into the
    delivery log as the service logs it, so an incident's later changes are updates
    (`Notification.update`) of its page."""
    clock = EventClock()
    disp = Dispatcher(Router(notify), SilenceStore(), notify.send_resolved,
                      clock=clock.mono, wallclock=clock.now)  # fmt: skip
    sent: list[Notification] = []

    def flush_until(t: float) -> None:
        while True:
            idle = [g.next_flush for g in disp.groups.values() if not g.busy]
            if not idle or min(idle) > t:
                break
            clock.t = max(clock.t, min(idle))
            for group in disp.due():
                f = disp.plan(group)
                n = f.notification
                record = None
                if n is not None:
                    record = n.record
                    if n.send:
                        sent.append(n)
                        record = n.logged(n.message_ref if n.update else {"notification_id": n.notification_id})
                disp.complete(f, record)

    ordered = sorted(alerts, key=lambda a: (a.window_end, a.ts))
    for i, a in enumerate(ordered):
        t = a.window_end.timestamp()
        flush_until(t)
        clock.t = max(clock.t, t)
        disp.apply(a, (0, i))
    flush_until(until.timestamp())
    return sent


def attribute(sent: list[Notification], scores: Score, w: int) -> None:
    """Count each message against the incidents whose zone one of its alerts started in;
    a message holding only the alerts of budget crossings is a budget notification. An
    update (an edit of the incident's message: a person was paged once) is counted apart,
    as an update, not as a notification."""
    zones = [(s, *zone(s.incident, w)) for s in scores.incidents]
    for n in sent:
        listed = [*n.firing, *n.resolved]
        if n.update:
            scores.updates += 1
        else:
            scores.notifications += 1
        others = [a for a in listed if (a.fingerprint, a.started_at) not in scores.budget_episodes]
        if listed and not others:
            scores.budget_notifications += not n.update
            continue
        hit = False
        for s, lo, hi in zones:
            if any(lo <= a.started_at.timestamp() < hi for a in others):
                if n.update:
                    s.updates += 1
                else:
                    s.notifications += 1
                hit = True
        scores.notifications_outside += not hit and not n.update


# -- the replay ---------------------------------------------------------------------------------
def messages(
    w: Workload, traffic: Traffic, settings: Settings
) -> Iterator[tuple[str, bytes, bytes]]:
    """(topic, key, value): the workload's events, then one closer per model and GPU far past
    the data so every partition's event time passes the last window."""
    topics = {"calls": settings.kafka.topic("calls"), "gpu": settings.kafka.topic("gpu")}
    models: set[str] = set()
    for kind, key, ev in traffic.events():
        if kind == "calls":
            models.add(key)
        yield topics[kind], key.encode(), encode(ev)
    after = w.end + timedelta(seconds=200)
    for m in sorted(models):
        closer = {
            "schema_version": SCHEMA_VERSION,
            "event_id": f"closer-{w.seed}-{m}",
            "ts": after,
            "model": m,
        }
        yield topics["calls"], m.encode(), encode(closer)
    for g in range(GPUS):
        closer = {"event_id": f"closer-{w.seed}-gpu{g}", "ts": after, "host": GPU_HOST, "gpu_index": g,
                  "utilization_gpu_pct": 0.0}  # fmt: skip
        yield topics["gpu"], GPU_HOST.encode(), encode(closer)


def _produce(
    bootstrap: str, msgs: Iterable[tuple[str, bytes, bytes]], done: dict[str, Any]
) -> None:
    # one request in flight per connection: a retried batch (a broker timeout under load)
    # cannot land after the next one. At replay speed a minute of event time passes in a
    # second or two, so a batch landing late by a retry's backoff holds events of windows
    # already closed (past the 5 s grace): dead-lettered as late, missing from the windows
    # the rules judge, and two runs of a seed judge different windows (idempotence, which
    # would also keep the order, is off in this project's producers)
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "log_level": 3,
                  "max.in.flight.requests.per.connection": 1})  # fmt: skip
    n, left = produce_all(p, msgs, 120)
    done.update(n=n, undelivered=left, t=time.monotonic())


def replay(w: Workload, rules: Path | None, timeout_s: float, window_s: int) -> dict[str, Any]:
    budgets = [r for r in load_rules(rules, (10, 60)).rules if isinstance(r, BudgetRule)]
    traffic = Traffic(w, budgets)
    last_window = datetime.fromtimestamp(_floor(w.end - timedelta(seconds=1), window_s), UTC)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with broker(work) as b:
            config, _ = make_config(
                work, b.bootstrap,
                worker={"windows_s": [10, 60], "grace_s": 5.0, "idle_close_s": 30.0, "batch_max_messages": 2000},
            )  # fmt: skip
            if rules is not None:
                data = yaml.safe_load(config.read_text())
                data["rules_file"] = str(rules.resolve())
                config.write_text(yaml.safe_dump(data))
            settings = load_settings(config, environ={})
            worker = start(config, "worker", log=work / "worker.log")
            alerts_topic = settings.kafka.topic("alerts")
            dead_topic = settings.kafka.topic("deadletter")
            consumer = topic_reader(b.bootstrap, [settings.kafka.topic("aggregates"), alerts_topic, dead_topic])
            alerts: list[Alert] = []
            # the calls of each all-traffic 60 s window as first published, and its revisions
            first_calls: dict[int, int] = {}
            revised: set[int] = set()
            dead: Counter[str] = Counter()
            late_by_model: Counter[str] = Counter()
            done: dict[str, Any] = {}
            try:
                time.sleep(10)  # the worker joins its group (Tansu answers JoinGroup after ~3 s)
                t0 = time.monotonic()
                producer = threading.Thread(
                    target=_produce,
                    args=(b.bootstrap, messages(w, traffic, settings), done),
                    daemon=True,
                )
                producer.start()
                closed = {"calls": False, "gpu": False}
                seen_until = w.start
                last_note = last_got = time.monotonic()
                closed_at: float | None = None
                while True:
                    got = consumer.consume(5000, 0.5)
                    if got:
                        last_got = time.monotonic()
                    for m in got:
                        if m.error() is not None:
                            continue
                        value = m.value() or b""
                        if m.topic() == alerts_topic:
                            alerts.append(Alert.model_validate_json(value))
                        elif m.topic() == dead_topic:
                            d = json.loads(value)
                            dead[d.get("kind", "?")] += 1
                            if d.get("kind") == "late":
                                late_by_model[str(json.loads(d.get("payload") or "{}").get("model"))] += 1
                        elif b'"dims_key":"*"' in value or b'"kind":"gpu"' in value:
                            a = json.loads(value)
                            if a.get("window_s") == window_s and a.get("kind") in closed:
                                ws = datetime.fromisoformat(a["window_start"])
                                if a["kind"] == "calls":
                                    seen_until = max(seen_until, ws)
                                    t = int(ws.timestamp())
                                    if int(a.get("revision", 1)) > 1:
                                        revised.add(t)
                                    first_calls.setdefault(t, int(a.get("requests", 0)))
                                if ws >= last_window:
                                    closed[a["kind"]] = True
                    if closed_at is None and all(closed.values()):
                        closed_at = time.monotonic()
                    # every window is closed: read on until the alerts of the last ones are in
                    if closed_at is not None and time.monotonic() - last_got > 10:
                        break
                    if worker.poll() is not None:
                        raise RuntimeError(
                            f"the worker exited with {worker.returncode}: {work / 'worker.log'}"
                        )
                    if time.monotonic() - t0 > timeout_s:
                        raise TimeoutError(
                            f"not done in {timeout_s} s: windows closed up to {seen_until}"
                        )
                    if time.monotonic() - last_note > 60:
                        last_note = time.monotonic()
                        done_h = (seen_until - w.start).total_seconds() / 3600
                        print(f"  {time.monotonic() - t0:6.0f} s: windows closed through {done_h:.1f} of "
                              f"{w.span_s / 3600:.1f} h, {len(alerts)} alerts", file=sys.stderr, flush=True)  # fmt: skip
                wall = closed_at - t0
                producer.join(60)
                if done.get("undelivered"):
                    raise RuntimeError(f"{done['undelivered']} messages not delivered")
            finally:
                consumer.close()
                stop(worker)
    # each window's calls as the rules judged them (its first publication) against the workload's
    short = {
        t: n - first_calls.get(t, 0)
        for t, n in traffic.per_minute.items()
        if t % window_s == 0 and window_s == 60 and n > first_calls.get(t, 0)
    }
    integrity = {
        "dead_letters_late": dead["late"],
        "dead_letters_invalid": dead["invalid"],
        "late_by_model": ", ".join(f"{k} {v}" for k, v in late_by_model.most_common()),
        "windows_short": len(short),
        "calls_missing_from_windows": sum(short.values()),
        "windows_short_first": ", ".join(
            f"{datetime.fromtimestamp(t, UTC):%d %H:%M} -{short[t]}" for t in sorted(short)[:10]
        ),
        "windows_republished": len(revised),
    }
    return {"alerts": alerts, "wall_s": wall, "messages": done.get("n", 0), "counts": traffic.counts,
            "settings": settings, "crossings": traffic.ledger.crossings, "integrity": integrity}  # fmt: skip


def judge_offline(w: Workload, rules: Path | None, window_s: int) -> dict[str, Any]:
    """The workload judged in this process, no broker and no worker: each event added to the
    accumulator of its window and dimension set (the worker's accumulators, dimension sets and
    window sizes), a window final once event time reaches its end (the events come in order),
    judged by the worker's RulesRuntime with its root-cause step, open alerts swept at each
    window end. What the worker must publish for this workload when it loses no event: a
    reference for a replay (`--offline` next to a replay of the same seed) and a quick loop
    for trying rules. The sweep's clock is the last window end, so a quiet series' resolution
    can come a window apart from the worker's."""
    settings = Settings()
    runtime = RulesRuntime(rules, settings.worker.windows_s, reload_every_s=math.inf)
    budgets = [r for r in runtime.engine.rules.rules if isinstance(r, BudgetRule)]
    traffic = Traffic(w, budgets)
    sizes = sorted({r.window for r in runtime.engine.rules.rules if not isinstance(r, CompositeRule)})
    dim_sets = {"calls": [tuple(d) for d in settings.worker.dimensions], "gpu": [("host", "gpu")]}
    open_windows: dict[tuple[str, int, int], dict[str, tuple[dict[str, str], Any]]] = {}
    states: dict[tuple[str, int, str], dict[str, Any]] = {}
    alerts: list[Alert] = []
    first_calls: dict[int, int] = {}

    def finalize_through(t_ms: int) -> None:
        due = sorted((k for k in open_windows if k[2] + k[1] * 1000 <= t_ms), key=lambda k: (k[2] + k[1] * 1000, k[0], k[1]))
        for i, (kind, size, start) in enumerate(due):
            window = open_windows.pop((kind, size, start))
            aggs = [acc.result(size, start, dims, dk) for dk, (dims, acc) in sorted(window.items())]
            for agg in aggs:
                if kind == "calls" and size == 60 and agg.dims_key == "*":
                    first_calls[start // 1000] = agg.requests
                if not runtime.engine.applies(agg):
                    continue
                key = (kind, size, agg.dims_key)
                got, state = runtime(agg, states.get(key))
                if state is not None:
                    states[key] = state
                alerts.extend(explain_window(aggs, got) if got else got)
            end = start + size * 1000
            nxt = due[i + 1] if i + 1 < len(due) else None
            if nxt is not None and (nxt[2] + nxt[1] * 1000, nxt[0]) == (end, kind):
                continue
            # as the worker sweeps: with the kind's event time, once its windows to then are judged
            now = datetime.fromtimestamp(end / 1000, UTC)
            for (k, _, _), st in states.items():
                if k == kind and has_open_alerts(st):
                    alerts.extend(runtime.sweep(st, now))

    for kind, _key, ev in traffic.events():
        if kind == "calls":
            event: Any = ev
        else:
            event = GpuSample.model_validate(ev)
        t_ms = int(event.ts.timestamp() * 1000)
        finalize_through(t_ms)
        cls = ACCUMULATORS[kind]
        names = cls.dimension_names
        tup = cls.key_of(event)
        for size in sizes:
            start = t_ms - t_ms % (size * 1000)
            window = open_windows.setdefault((kind, size, start), {})
            for ds in dim_sets[kind]:
                dims = {}
                for d in ds:
                    v = tup[names.index(d)]
                    if v == "":
                        break
                    dims[d] = v
                else:
                    dk = dimensions_key(dims)
                    slot = window.get(dk)
                    if slot is None:
                        slot = window[dk] = (dims, cls())
                    slot[1].agg(event)
    finalize_through(int((w.end + timedelta(seconds=200)).timestamp() * 1000))
    short = {t: n - first_calls.get(t, 0) for t, n in traffic.per_minute.items() if n > first_calls.get(t, 0)}
    assert not short, f"windows short of calls in-process: {short}"
    return {"alerts": alerts, "wall_s": 0.0, "messages": 0, "counts": traffic.counts,
            "settings": settings, "crossings": traffic.ledger.crossings, "integrity": {}}  # fmt: skip


def main() -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--days", type=float, default=3.0, help="simulated days (default 3)")
    ap.add_argument("--seed", type=int, default=1, help="moves the incidents and redraws the noise")
    ap.add_argument(
        "--incidents", type=int, default=12, help="labelled incidents (default 12, 2 of each kind)"
    )
    ap.add_argument(
        "--rules", type=Path, default=None, help="a rules file (default: the shipped rules)"
    )
    ap.add_argument("--rate", type=float, default=4.0, help="calls a second at the daily peak")
    ap.add_argument(
        "--start-hour", type=float, default=0.0, help="UTC hour of day the span starts at"
    )
    ap.add_argument(
        "--window-s", type=int, default=60, help="the rules' window (recall within 2 of them)"
    )
    ap.add_argument("--timeout-s", type=float, default=4 * 3600.0)
    ap.add_argument(
        "--offline",
        action="store_true",
        help="judge the workload in this process (no broker, no worker): the reference a replay must match",
    )
    ap.add_argument(
        "--alerts-out",
        type=Path,
        default=None,
        help="also write every alert event here (JSON lines)",
    )
    args = ap.parse_args()
    if args.rules is not None and not args.rules.is_file():
        raise SystemExit(f"--rules {args.rules}: no such file")
    cal = calibration()
    w = plan(
        args.seed,
        day_start(args.days, args.start_hour),
        args.days * DAY_S,
        args.incidents,
        args.rate,
    )
    print(
        f"detection: {args.days} days from {w.start:%Y-%m-%d %H:%M} UTC, seed {args.seed}, incidents:",
        file=sys.stderr,
    )
    for inc in w.incidents:
        print(f"  {inc.describe()} (x{inc.factor})", file=sys.stderr)
    if args.offline:
        t0 = time.monotonic()
        r = judge_offline(w, args.rules, args.window_s)
        r["wall_s"] = time.monotonic() - t0
    else:
        r = replay(w, args.rules, args.timeout_s, args.window_s)
    alerts: list[Alert] = r["alerts"]
    if args.alerts_out is not None:
        args.alerts_out.write_text("".join(a.model_dump_json() + "\n" for a in alerts))
    s = score(w.incidents, alerts, args.window_s, w.end, r["crossings"])
    sent = notifications(
        [a for a in alerts if a.window_start < w.end],
        r["settings"].notify,
        w.end + timedelta(minutes=10),
    )
    attribute(sent, s, args.window_s)
    n = len(s.incidents)
    days = w.span_s / DAY_S
    recalled = [x for x in s.incidents if x.recalled]
    detect = [x.detect_s for x in recalled if x.detect_s is not None]
    print(
        "incident                                                        recalled detect_s first rule  notifications updates",
        file=sys.stderr,
    )
    for x in s.incidents:
        print(f"  {x.incident.describe():60} {x.recalled!s:8} {x.detect_s!s:8} {x.first_rule:12} {x.notifications:<13} {x.updates}"
              f"{'' if x.any_alert else '  (no alert at all)'}", file=sys.stderr)  # fmt: skip
    out: dict[str, Any] = {
        "seed": args.seed,
        "days": args.days,
        "mode": "offline (in-process windows and rules, no worker)" if args.offline else "replay through the worker",
        "rules": str(args.rules) if args.rules else "llmpulse/defaults/rules.yaml (shipped)",
        "recall": round(len(recalled) / n, 3) if n else None,
        "recall_start_plus_2w": round(sum(x.recalled_start_plus_2w for x in s.incidents) / n, 3) if n else None,
        "false_alerts_per_day": round(sum(s.false_by_rule.values()) / days, 2),
        "notifications_per_incident": round(sum(x.notifications for x in s.incidents) / n, 2)
        if n
        else None,
        "detect_p50_s": statistics.median(detect) if detect else None,
        "detect_max_s": max(detect) if detect else None,
        "incidents": n,
        "incidents_at_peak": sum(
            13.5 <= x.incident.start.hour + x.incident.start.minute / 60 < 16 for x in s.incidents
        ),
        "missed": "; ".join(x.incident.describe() for x in s.incidents if not x.recalled),
        "false_alerts": sum(s.false_by_rule.values()),
        "notifications": s.notifications,
        "notification_updates": s.updates,
        "updates_per_incident": round(sum(x.updates for x in s.incidents) / n, 2) if n else None,
        "incidents_without_notification": sum(x.notifications == 0 for x in s.incidents),
        "notifications_outside_incidents_per_day": round(s.notifications_outside / days, 2),
        "budget_crossings": s.budget_crossings,
        "budget_alerts_on_time": s.budget_on_time,
        "budget_missed": "; ".join(s.budget_missed),
        "budget_notifications": s.budget_notifications,
        "budget_notifications_per_day": round(s.budget_notifications / days, 2),
        "alerts_firing": sum(a.state == "firing" for a in alerts),
        "alerts_resolved": sum(a.state == "resolved" for a in alerts),
        "events": r["counts"]["calls"] + r["counts"]["gpu_samples"],
        "calls": r["counts"]["calls"],
        "gpu_samples": r["counts"]["gpu_samples"],
        "background_errors": r["counts"]["background_errors"],
        "rate_per_s_peak": args.rate,
        "wall_s": round(r["wall_s"], 1),
        "events_per_s": round(
            (r["counts"]["calls"] + r["counts"]["gpu_samples"]) / max(1e-9, r["wall_s"]), 1
        ),
        "notifications_grouping": "notifier's Dispatcher (grouping.py), default notify routes, event-time clock",
        **r["integrity"],
        **cal,
    }
    for kind in KINDS:
        of_kind = [x for x in s.incidents if x.incident.kind == kind]
        out[f"incidents_{kind}"] = len(of_kind)
        out[f"recall_{kind}"] = (
            round(sum(x.recalled for x in of_kind) / len(of_kind), 3) if of_kind else None
        )
    for rule, count in sorted(s.false_by_rule.items()):
        out[f"false_alerts_{rule}"] = count
    return out
