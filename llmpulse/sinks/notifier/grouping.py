"""Aggregation groups in the manner of Prometheus Alertmanager.

An aggregation group is one (route, receiver, group_by values). Its first alert
waits `group_wait` so that a burst arrives as one digest; after a flush the group
is looked at every `group_interval`, and it notifies only when something changed
for its receiver (a new or escalated firing alert, a resolution of what the receiver
was told is firing) or when `repeat_interval` passed with alerts still firing.

What each receiver was told lives in the delivery log (`DeliveryRecord`, one per
group), which is the whole of the state a restart needs: the groups come back from
it, and replayed alerts that were already notified are recognised and not resent.

Muting happens at flush time: silences, and inhibition (a fingerprint that is
firing as critical mutes its warning everywhere until it resolves).

Kafka offsets ("refs") of the alerts a group holds are handed back only once the
group has notified them, resolved them, or decided they need no message; a muted
alert that was never notified keeps its ref, so a restart replays it.

Incident grouping (``group_by: [incident]``): one incident, one page. An alert that fires
while a group of its route and receiver still has firing alerts joins that group (the
open incident) when it is part of the same outage: it started within
``INCIDENT_JOIN_S`` (30 min) of the group's first alert, whatever its rule or dimensions
(the model, app and key alerts of one outage, as its effects spread),
or, up to an hour after it, it shares a dimension value with an alert of the group
(the SLO burn of that model, minutes later). An unrelated outage later in that hour
opens its own incident and gets its own page: a budget alert firing all day, or an
incident on one model, must not swallow the next one on another. A new message goes out
when the incident opens (after ``group_wait``), when every alert of it has resolved, and
on ``repeat_interval``: a person is paged once per incident. In between, any change (an
escalation to a higher severity, an alert joining, one of several resolving) is an
*update* (``Notification.update``) of the incident's message: the receiver edits it
(Slack: chat.update, plus a thread reply saying what changed; the webhook: a POST marked
as an update of the incident). The receiver's handle of that message
(``DeliveryRecord.message_ref``) lives in the delivery log, so an update after a restart
edits the right message. Without a handle (a Slack incoming webhook cannot edit; the page
was not delivered) an escalation is a new message and the other changes are recorded in
the delivery log without one. The group's label names the dimension at fault of the
alert that opened it (its dimensions, else its root cause) and when.

Budgets (``rule_type: budget``, a running total per UTC day) are paced apart: a budget
alert is never repeated on ``repeat_interval`` (a spent budget does not get better by
waiting; its next news is the escalation at critical or the day's end), and under incident
grouping it opens a group of its own that nothing joins and that it joins nobody's: it
fires once a day on ordinary traffic and is no outage, so it must neither swallow an
incident's page nor ride along on one.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from llmpulse.schemas.alert import Alert
from llmpulse.schemas.base import utc_now
from llmpulse.sinks.notifier.models import SEVERITY_RANK, DeliveryRecord, FiringEntry
from llmpulse.sinks.notifier.routing import Route, Router, group_key_of
from llmpulse.sinks.notifier.silences import SilenceStore

Ref = tuple[int, int]
"""(partition, offset) of an alert message on the alerts topic."""

RESOLVED_MAX = 1000
INCIDENT = "incident"
"""The `group_by` label that groups by open incident (see the module docstring)."""
INCIDENT_SPAN_S = 3600.0
"""An alert joins an open incident only if it started within this long of the incident's
first alert, so a long-firing alert (a daily budget) does not swallow the next outage."""
NO_REPEAT_TYPES = frozenset({"budget"})
"""Rule types whose firing alerts are not repeated on repeat_interval (see the docstring)."""
BUDGET_LABEL = "budget"
"""The label of an incident group opened by a budget alert (it holds that budget only)."""
INCIDENT_JOIN_S = 1800.0
"""Alerts starting within this long of an incident's first alert join it whatever their
dimensions; later ones (up to INCIDENT_SPAN_S) only if they share a dimension value.
Chosen on the detection bench's alert streams (seeds 2, 3, 4, rescored offline): 300 s split
one 19-minute token spike into 4 incidents (3.5 notifications per incident), 1800 s gave
2.0-2.5 with no incident left unpaged, 3600 s (join anything within the hour) left one
incident in three runs unpaged, swallowed by a daily budget alert."""


def fault_of(alert: Alert) -> str:
    """The dimension at fault: the alert's dimensions, else its root cause, else its rule."""
    if alert.dimensions:
        return ",".join(f"{k}={alert.dimensions[k]}" for k in sorted(alert.dimensions))
    rc = alert.root_cause or {}
    if "dimension" in rc and "value" in rc:
        return f"{rc['dimension']}={rc['value']}"
    return alert.rule


def fault_values(alert: Alert) -> set[str]:
    """Every `dimension=value` the alert points at: its dimensions and its root cause."""
    out = {f"{k}={v}" for k, v in alert.dimensions.items()}
    rc = alert.root_cause or {}
    if "dimension" in rc and "value" in rc:
        out.add(f"{rc['dimension']}={rc['value']}")
    return out


def same_incident(alert: Alert, group_alerts: list[Alert]) -> bool:
    """Whether a new alert belongs to the open incident made of `group_alerts`."""
    first = min(a.started_at for a in group_alerts)
    age = abs((alert.started_at - first).total_seconds())
    if age > INCIDENT_SPAN_S:
        return False
    if age <= INCIDENT_JOIN_S:
        return True
    mine = fault_values(alert)
    return any(mine & fault_values(a) for a in group_alerts)


def group_id_of(route: str, receiver: str, group_key: str) -> str:
    return f"{route}|{receiver}|{group_key}"


@dataclass
class Group:
    gid: str
    route: Route
    receiver: str
    key: str
    labels: dict[str, str]
    alerts: dict[str, Alert] = field(default_factory=dict)
    refs: dict[str, list[Ref]] = field(default_factory=dict)
    next_flush: float = 0.0
    busy: bool = False


@dataclass
class Notification:
    """One message to one receiver (or, when `send` is False, a delivery-log update only).

    `update`: an edit of the incident's message (`message_ref`, the receiver's handle of it)
    rather than a new one; `escalated` and `new` say what changed (`resolved` lists the
    alerts resolved since, when the incident goes on)."""

    notification_id: str
    group_id: str
    route: str
    receiver: str
    group_key: str
    group_labels: dict[str, str]
    firing: list[Alert]
    new: set[str]
    resolved: list[Alert]
    record: DeliveryRecord
    send: bool = True
    update: bool = False
    escalated: set[str] = field(default_factory=set)
    message_ref: dict[str, str] = field(default_factory=dict)

    @property
    def severity(self) -> str:
        if any(a.severity == "critical" for a in self.firing):
            return "critical"
        return "warning" if self.firing else "resolved"

    def logged(self, handle: Mapping[str, str] | None) -> DeliveryRecord:
        """The delivery-log record once the receiver took this message and answered `handle`
        (its handle of the message it posted or edited; None when it cannot edit). A page
        keeps the incident's first message (a reminder does not replace it); an update keeps
        the message it edited, or the new one it posted when the edit could not be made; a
        message with nothing left firing keeps none (there is nothing left to edit)."""
        if not handle or not self.record.firing or not (self.update or not self.record.message_ref):
            return self.record
        return self.record.model_copy(update={"message_ref": dict(handle)})


@dataclass
class Flush:
    group: Group
    snapshot: dict[str, Alert]
    refs: dict[str, list[Ref]]
    held_back: set[str]
    notification: Notification | None


def notification_id_of(gid: str, seq: int, alerts: list[Alert]) -> str:
    """Deterministic: the same group, sequence number and alert states give the same id."""
    h = hashlib.sha256(f"{gid}\n{seq}\n".encode())
    for item in sorted(f"{a.alert_id}:{a.state}:{a.severity}" for a in alerts):
        h.update(item.encode())
        h.update(b"\n")
    return h.hexdigest()[:32]


class Dispatcher:
    def __init__(
        self,
        router: Router,
        silences: SilenceStore,
        send_resolved: bool = True,
        clock: Callable[[], float] = time.monotonic,
        wallclock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.router = router
        self.silences = silences
        self.send_resolved = send_resolved
        self.clock = clock
        self.wallclock = wallclock
        self.groups: dict[str, Group] = {}
        self.holding: dict[str, set[str]] = {}
        self.critical: set[str] = set()
        self.nflog: dict[str, DeliveryRecord] = {}

    # -- state -------------------------------------------------------------------------

    def _group(self, route: Route, receiver: str, labels: dict[str, str], wait: float) -> Group:
        key = group_key_of(labels)
        gid = group_id_of(route.name, receiver, key)
        group = self.groups.get(gid)
        if group is None:
            group = Group(gid, route, receiver, key, labels, next_flush=self.clock() + wait)
            self.groups[gid] = group
        return group

    def restore(self, record: DeliveryRecord) -> None:
        """Take one delivery-log record read at start (the latest per group wins)."""
        self.nflog[record.group_id] = record
        route = self.router.by_name.get(record.route)
        if route is None or record.receiver not in route.receivers or not record.alerts:
            self.groups.pop(record.group_id, None)
            return
        elapsed = (self.wallclock() - record.ts).total_seconds()
        wait = max(0.0, route.group_interval_s - elapsed)
        group = self._group(route, record.receiver, dict(record.group_labels), wait)
        group.alerts = {a.fingerprint: a for a in record.alerts}
        for a in record.alerts:
            self.holding.setdefault(a.fingerprint, set()).add(group.gid)
            if a.state == "firing" and a.severity == "critical":
                self.critical.add(a.fingerprint)

    def apply(self, alert: Alert, ref: Ref) -> int:
        """Add an alert to its groups; returns how many groups now hold `ref`."""
        fp = alert.fingerprint
        targets: list[Group] = []
        if alert.state == "firing":
            for route in self.router.match(alert):
                labels = route.group_labels(alert)
                key = group_key_of(labels)
                for receiver in route.receivers:
                    if INCIDENT in route.group_by:
                        group = self._incident_group(route, receiver, alert)
                        if group is not None:
                            targets.append(group)
                        continue
                    gid = group_id_of(route.name, receiver, key)
                    prev = self.nflog.get(gid)
                    if prev is not None and prev.resolved.get(fp) == alert.started_at:
                        continue  # a replayed firing alert whose resolution was already sent
                    targets.append(self._group(route, receiver, labels, route.group_wait_s))
        else:
            # a resolution goes to every group that holds the fingerprint: where the firing went
            for gid in sorted(self.holding.get(fp, ())):
                group = self.groups.get(gid)
                if group is not None:
                    targets.append(group)
        if alert.state == "firing" and alert.severity == "critical":
            self.critical.add(fp)
        elif alert.state == "resolved":
            self.critical.discard(fp)
        for group in targets:
            group.alerts[fp] = alert
            group.refs.setdefault(fp, []).append(ref)
            self.holding.setdefault(fp, set()).add(group.gid)
        return len(targets)

    def _incident_group(self, route: Route, receiver: str, alert: Alert) -> Group | None:
        """The open incident of (route, receiver) this alert joins, or a new one it opens."""
        fp = alert.fingerprint
        budget = alert.rule_type == "budget"
        for gid in sorted(self.holding.get(fp, ())):  # an update of an alert already held
            group = self.groups.get(gid)
            if group is not None and group.route.name == route.name and group.receiver == receiver:
                held = group.alerts.get(fp)
                if budget and held is not None and held.started_at != alert.started_at:
                    # a new day's budget alert (yesterday's resolution may not have gone
                    # out yet, in the same window): a page of its own, not an overwrite
                    continue
                prev = self.nflog.get(gid)
                if prev is not None and prev.resolved.get(fp) == alert.started_at:
                    return None  # a replayed firing alert whose resolution was already sent
                return group
        open_groups = sorted(
            (
                g
                for g in self.groups.values()
                if g.route.name == route.name
                and g.receiver == receiver
                and INCIDENT in g.labels
                and BUDGET_LABEL not in g.labels
                and any(a.state == "firing" for a in g.alerts.values())
                and same_incident(alert, list(g.alerts.values()))
            ),
            key=lambda g: g.gid,
        )
        if open_groups and not budget:
            return open_groups[0]
        labels = {k: v for k, v in route.group_labels(alert).items() if k != INCIDENT}
        if budget:
            labels[BUDGET_LABEL] = alert.rule
        labels[INCIDENT] = f"{fault_of(alert)} since {alert.started_at.strftime('%Y-%m-%dT%H:%M:%SZ')}"
        return self._group(route, receiver, labels, route.group_wait_s)

    def due(self) -> list[Group]:
        now = self.clock()
        return [g for g in self.groups.values() if not g.busy and g.next_flush <= now]

    def next_due_in(self) -> float | None:
        idle = [g.next_flush for g in self.groups.values() if not g.busy]
        return max(0.0, min(idle) - self.clock()) if idle else None

    # -- flushing ------------------------------------------------------------------------

    def muted(self, alert: Alert, now: datetime) -> bool:
        if alert.severity == "warning" and alert.fingerprint in self.critical:
            return True
        return self.silences.silenced_by(alert, now) is not None

    def plan(self, group: Group) -> Flush:
        """Decide what the group tells its receiver now; marks the group busy."""
        now = self.wallclock()
        group.busy = True
        group.next_flush = self.clock() + group.route.group_interval_s
        snapshot = dict(group.alerts)
        refs, group.refs = group.refs, {}
        prev = self.nflog.get(group.gid)
        told = prev.firing if prev is not None else {}
        visible: list[Alert] = []
        hidden_told: list[Alert] = []
        held_back: set[str] = set()
        resolved: list[Alert] = []
        resolved_quietly: list[Alert] = []
        for fp, a in snapshot.items():
            if a.state == "firing":
                if self.muted(a, now):
                    if fp in told:
                        hidden_told.append(a)
                    else:
                        held_back.add(fp)
                else:
                    visible.append(a)
            elif fp in told:
                if self.send_resolved and self.silences.silenced_by(a, now) is None:
                    resolved.append(a)
                else:
                    resolved_quietly.append(a)
        new: set[str] = set()
        escalated: set[str] = set()
        for a in visible:
            entry = told.get(a.fingerprint)
            if entry is None or entry.started_at != a.started_at:
                new.add(a.fingerprint)
            elif SEVERITY_RANK[a.severity] > SEVERITY_RANK[entry.severity]:
                new.add(a.fingerprint)
                escalated.add(a.fingerprint)
        repeat = any(a.rule_type not in NO_REPEAT_TYPES for a in visible) and prev is not None and (
            (now - prev.ts).total_seconds() >= group.route.repeat_interval_s
        )
        send = bool(new or resolved or repeat)
        record_only = False
        update = False
        ref = dict(prev.message_ref) if prev is not None and told else {}
        if INCIDENT in group.labels:
            # one incident, one page: a new message when it opens, when all of it has resolved
            # and on repeat_interval; any change in between edits the page (`ref`), or, where
            # the receiver cannot edit or the page was never delivered (no handle), an
            # escalation is a new message and the rest is recorded without one
            told_rank = max((SEVERITY_RANK[e.severity] for e in told.values()), default=0)
            now_rank = max((SEVERITY_RANK[a.severity] for a in visible), default=0)
            partial: list[Alert] = []
            if visible and resolved:
                partial, resolved = resolved, []
            opened = bool(visible) and not told
            page = opened or bool(resolved) or repeat
            if not page and ref and (new or partial):
                update = True
                resolved = partial  # the edited message and its thread say what resolved
            else:
                resolved_quietly.extend(partial)
            send = page or update or now_rank > told_rank
            record_only = bool(new) and not send
        if not send and not resolved_quietly and not record_only:
            return Flush(group, snapshot, refs, held_back, None)
        firing: dict[str, FiringEntry] = {}
        for a in visible:
            entry = told.get(a.fingerprint)
            severity = a.severity
            if entry is not None and entry.started_at == a.started_at:
                severity = max(severity, entry.severity, key=lambda s: SEVERITY_RANK[s])  # type: ignore[assignment]
            firing[a.fingerprint] = FiringEntry(severity=severity, started_at=a.started_at)
        for a in hidden_told:
            firing[a.fingerprint] = told[a.fingerprint]
        memory = dict(prev.resolved) if prev is not None else {}
        for a in (*resolved, *resolved_quietly):
            memory[a.fingerprint] = a.started_at
        if len(memory) > RESOLVED_MAX:
            memory = dict(sorted(memory.items(), key=lambda kv: kv[1])[-RESOLVED_MAX:])
        seq = (prev.seq if prev is not None else 0) + 1
        listed = [*visible, *resolved]
        record = DeliveryRecord(
            group_id=group.gid,
            route=group.route.name,
            receiver=group.receiver,
            group_key=group.key,
            group_labels=group.labels,
            notification_id=notification_id_of(group.gid, seq, listed or resolved_quietly),
            seq=seq,
            ts=now,
            firing=firing,
            alerts=[*visible, *hidden_told],
            resolved=memory,
            covered=[a.alert_id for a in listed],
            message_ref=ref if firing else {},
        )
        notification = Notification(
            notification_id=record.notification_id,
            group_id=group.gid,
            route=group.route.name,
            receiver=group.receiver,
            group_key=group.key,
            group_labels=group.labels,
            firing=sorted(visible, key=lambda a: (-SEVERITY_RANK[a.severity], a.fingerprint)),
            new=new,
            resolved=sorted(resolved, key=lambda a: a.fingerprint),
            record=record,
            send=send,
            update=update,
            escalated=escalated,
            message_ref=ref,
        )
        return Flush(group, snapshot, refs, held_back, notification)

    def complete(self, flush: Flush, record: DeliveryRecord | None) -> list[Ref]:
        """The flush is over (`record` is what was logged, if anything); returns refs to release."""
        group = flush.group
        if record is not None:
            self.nflog[group.gid] = record
        release: list[Ref] = []
        for fp, refs in flush.refs.items():
            if fp in flush.held_back and group.alerts.get(fp) is flush.snapshot.get(fp):
                group.refs[fp] = [*refs, *group.refs.get(fp, [])]
            else:
                release.extend(refs)
        for fp, a in flush.snapshot.items():
            if a.state == "resolved" and group.alerts.get(fp) is a:
                del group.alerts[fp]
                holders = self.holding.get(fp)
                if holders is not None:
                    holders.discard(group.gid)
                    if not holders:
                        del self.holding[fp]
        group.busy = False
        if not group.alerts and not group.refs:
            self.groups.pop(group.gid, None)
        return release

    def abandon(self, flush: Flush) -> None:
        """The flush did not finish (shutdown): keep its refs unreleased, the alerts in place."""
        group = flush.group
        for fp, refs in flush.refs.items():
            group.refs[fp] = [*refs, *group.refs.get(fp, [])]
        group.busy = False
