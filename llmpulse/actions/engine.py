"""The action engine: alerts in, action steps out (`llmpulse actions run`).

It consumes the `alerts` topic (consumer group `actions.engine_group`), proposes the
actions of every matching action rule, applies them at once or holds them pending
approval, runs hooks, and publishes every step to the `actions` topic. Each tick it
expires pending actions nobody approved and applied actions whose duration is over,
and applies actions that a person approved (`llmpulse actions approve`). Run one engine
per deployment; the proxies enforce what it publishes.

    engine = ActionEngine(settings)      # bootstrap=... to skip resolve_bootstrap
    engine.start()                       # load the action state, join the alerts group
    engine.step()                        # one round: actions topic, alerts, tick
    engine.run()                         # until stop()
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timedelta
from typing import Any

from llmpulse.actions.hooks import run_hook
from llmpulse.actions.model import (
    applied_until,
    approval_timeout_of,
    matches,
    propose,
    step,
)
from llmpulse.actions.state import ActionStore, ActionTopic
from llmpulse.config import Settings
from llmpulse.config.actions import ActionRule
from llmpulse.kafka.bootstrap import resolve_bootstrap
from llmpulse.kafka.clients import consumer_settings
from llmpulse.kafka.topics import ALERTS, ensure_topics
from llmpulse.schemas.action import ActionEvent
from llmpulse.schemas.alert import Alert
from llmpulse.schemas.base import utc_now
from llmpulse.schemas.codec import decode

log = logging.getLogger(__name__)


class ActionEngine:
    def __init__(self, settings: Settings, bootstrap: str | None = None) -> None:
        self.settings = settings
        self.cfg = settings.actions
        self._bootstrap = bootstrap
        self.topic: ActionTopic | None = None
        self._consumer: Any = None
        self._stop = threading.Event()
        self.alerts_seen = 0
        self.rules_by_name: dict[str, ActionRule] = {r.name: r for r in self.cfg.rules}

    @property
    def store(self) -> ActionStore:
        assert self.topic is not None, "start() first"
        return self.topic.store

    # ---- lifecycle ----

    def start(self) -> ActionEngine:
        from confluent_kafka import Consumer

        bootstrap = self._bootstrap or resolve_bootstrap(self.settings)
        ensure_topics(bootstrap, self.settings.kafka)
        self.topic = ActionTopic(self.settings, bootstrap)
        self.topic.load()
        self._consumer = Consumer(consumer_settings(bootstrap, self.settings.kafka, self.cfg.engine_group))
        self._consumer.subscribe([self.settings.kafka.topic(ALERTS)])
        log.info(
            "action engine: %d action rules, %d live actions",
            len(self.cfg.rules), len(self.store.live()),
        )
        return self

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
        if self.topic is not None:
            self.topic.close()
            self.topic = None

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        if self.topic is None:
            self.start()
        try:
            while not self._stop.is_set():
                try:
                    self.step(self.cfg.tick_s)
                except Exception:
                    # a broker hiccup: alerts not committed are read again, steps are idempotent
                    log.exception("action engine round failed; retrying")
                    self._stop.wait(1.0)
        finally:
            self.close()

    def step(self, wait_s: float = 0.2) -> None:
        """One round: new steps on the actions topic, new alerts, then expiries and approvals."""
        assert self.topic is not None and self._consumer is not None
        self.topic.poll(0)
        from confluent_kafka import TopicPartition

        msgs = self._consumer.consume(500, wait_s)
        offsets: dict[tuple[str, int], int] = {}
        for m in msgs:
            if m.error() is not None:
                continue
            for alert in decode(m.value(), Alert).valid:
                self.alerts_seen += 1
                self.on_alert(alert)
            offsets[(m.topic(), m.partition())] = m.offset() + 1
        if offsets:
            self._consumer.commit(
                offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()], asynchronous=False
            )
        self.tick()

    # ---- decisions ----

    def publish(self, ev: ActionEvent) -> None:
        assert self.topic is not None
        self.topic.publish(ev)
        log.info("action %s %s: %s %s (%s)", ev.action_id, ev.status, ev.kind, ev.target, ev.reason or ev.actor)

    def on_alert(self, alert: Alert, now: datetime | None = None) -> list[ActionEvent]:
        """Propose (and apply, without approval) the actions of a firing alert; undo on resolution."""
        at = now or utc_now()
        if alert.state == "resolved":
            return self._on_resolved(alert, at)
        if (at - alert.ts).total_seconds() > self.cfg.max_alert_age:
            log.info("alert %s is older than actions.max_alert_age: no action", alert.fingerprint)
            return []
        out = []
        for rule in self.cfg.rules:
            if not matches(rule, alert):
                continue
            proposed = propose(rule, alert, at)
            if proposed is None:
                log.warning("action rule %s: alert %s names no target for %s", rule.name, alert.fingerprint, rule.action)
                continue
            if self.store.get(proposed.action_id) is not None:
                continue  # this incident already has this action
            self.publish(proposed)
            if rule.approve:
                until = at + timedelta(seconds=approval_timeout_of(self.cfg, rule.name))
                pending = step(proposed, "pending", expires_at=until, now=at, reason=proposed.reason)
                self.publish(pending)
                out.append(pending)
            else:
                out.append(self.apply(proposed, at))
        return out

    def _on_resolved(self, alert: Alert, at: datetime) -> list[ActionEvent]:
        out = []
        for ev in self.store.live():
            if ev.alert_fingerprint != alert.fingerprint or not ev.params.get("undo_on_resolve", True):
                continue
            if ev.kind == "hook" and ev.status == "applied":
                continue  # a hook ran once; nothing to undo
            done = step(ev, "undone", reason="the alert resolved", expires_at=ev.expires_at, now=at)
            self.publish(done)
            out.append(done)
        return out

    def apply(self, ev: ActionEvent, now: datetime | None = None, actor: str = "llmpulse") -> ActionEvent:
        at = now or utc_now()
        if ev.kind == "hook":
            rule = self.rules_by_name.get(ev.rule)
            if rule is None or rule.hook is None:
                out = step(ev, "failed", actor=actor, reason=f"action rule {ev.rule!r} is no longer configured", now=at)
                self.publish(out)
                return out
            payload = ev.params.get("alert", {})
            result = run_hook(rule.hook, payload if isinstance(payload, dict) else {})
            params = {**ev.params, "result": result.detail}
            out = step(ev, "applied" if result.ok else "failed", actor=actor, params=params, now=at, reason="hook ran" if result.ok else "hook failed")
        else:
            out = step(ev, "applied", actor=actor, expires_at=applied_until(ev, at), now=at, reason=ev.reason)
        self.publish(out)
        return out

    def tick(self, now: datetime | None = None) -> list[ActionEvent]:
        """Expire what is over, apply what was approved."""
        at = now or utc_now()
        out = []
        for ev in self.store.live():
            if ev.status == "pending" and ev.expires_at is not None and ev.expires_at <= at:
                out.append(step(ev, "expired", reason="not approved in time", now=at, expires_at=ev.expires_at))
                self.publish(out[-1])
            elif ev.status == "approved":
                out.append(self.apply(ev, at, actor=ev.actor))
            elif ev.status == "applied" and ev.expires_at is not None and ev.expires_at <= at:
                out.append(step(ev, "expired", reason="duration over", now=at, expires_at=ev.expires_at))
                self.publish(out[-1])
        return out


def run_engine(settings: Settings, *, bootstrap: str | None = None) -> None:
    """Blocking: run the engine until SIGINT/SIGTERM."""
    import signal

    engine = ActionEngine(settings, bootstrap)

    def _stop(*_: Any) -> None:
        engine.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    engine.start()
    t0 = time.monotonic()
    engine.run()
    log.info("action engine stopped after %.0fs, %d alerts seen", time.monotonic() - t0, engine.alerts_seen)
