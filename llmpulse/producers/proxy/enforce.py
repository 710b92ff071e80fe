"""Active actions as the proxy enforces them: one dict lookup per request.

`ProxyActions` follows the compacted `actions` topic in a thread (`ActionFollower`) and,
after each change, builds a new immutable `Enforcement` snapshot that the handler
reads with one attribute access; while no action is active, `snapshot.any` is False and
the handler skips everything. Rate-limit buckets live per action id and survive
snapshot rebuilds. Expiry is checked at lookup time too, so a limit lifts at its
`expires_at` even before the engine publishes the `expired` step.

Limits are per proxy instance: N proxies behind a load balancer let N times the limit
through in total (every instance enforces the same actions).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llmpulse.schemas.action import ActionEvent

if TYPE_CHECKING:
    from llmpulse.actions.state import ActionFollower, ActionStore
    from llmpulse.config import Settings

log = logging.getLogger(__name__)

RATE_LIMITED = "action_rate_limited"
BLOCKED = "action_blocked"
CIRCUIT_OPEN = "action_circuit_open"
SCOPES = ("api_key_hash", "user", "app")


class Bucket:
    """A token bucket: `per_minute` capacity, refilled at per_minute / 60 a second."""

    __slots__ = ("cap", "level", "rate", "t")

    def __init__(self, per_minute: int) -> None:
        self.cap = float(per_minute)
        self.rate = per_minute / 60.0
        self.level = self.cap
        self.t = time.monotonic()

    def _refill(self, now: float) -> None:
        self.level = min(self.cap, self.level + (now - self.t) * self.rate)
        self.t = now

    def take(self, n: float, now: float) -> float:
        """Take n now: 0.0, or the seconds until n are there (nothing taken)."""
        self._refill(now)
        if self.level >= n:
            self.level -= n
            return 0.0
        return (n - self.level) / self.rate if self.rate > 0 else 60.0

    def wait(self, now: float) -> float:
        """0.0 while something is left, else the seconds until the debt is paid back."""
        self._refill(now)
        if self.level > 0:
            return 0.0
        return (1.0 - self.level) / self.rate if self.rate > 0 else 60.0

    def charge(self, n: float) -> None:
        """Spend n after the fact (tokens of a finished call); may go into debt."""
        self._refill(time.monotonic())
        self.level -= n


@dataclass(slots=True)
class Limit:
    action_id: str
    until: float
    rpm: int | None
    tpm: int | None
    requests: Bucket | None
    tokens: Bucket | None

    def check(self, now: float) -> float:
        """0.0 to pass (a request is taken), else seconds to wait."""
        wait = self.tokens.wait(now) if self.tokens is not None else 0.0
        if wait > 0:
            return wait
        return self.requests.take(1, now) if self.requests is not None else 0.0


@dataclass(slots=True, frozen=True)
class Gate:
    """A block, a fallback route or an open circuit, until an epoch time."""

    action_id: str
    until: float
    model: str | None = None
    upstream: str | None = None


@dataclass(slots=True)
class Refusal:
    status: int
    error_type: str
    message: str
    code: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class Enforcement:
    """One snapshot of what to enforce. Handlers only read it."""

    limits: dict[str, dict[str, list[Limit]]] = field(default_factory=dict)
    blocks: dict[str, dict[str, Gate]] = field(default_factory=dict)
    routes: dict[str, Gate] = field(default_factory=dict)
    cuts: dict[str, Gate] = field(default_factory=dict)
    any: bool = False

    def refusal(self, values: tuple[str | None, str | None, str | None]) -> tuple[Refusal | None, list[Limit]]:
        """For (api_key_hash, user, app): a refusal, or None and the limits to charge tokens to."""
        now_wall = time.time()
        charge: list[Limit] = []
        for scope, value in zip(SCOPES, values, strict=True):
            if value is None:
                continue
            gates = self.blocks.get(scope)
            if gates:
                g = gates.get(value)
                if g is not None and now_wall < g.until:
                    return Refusal(
                        403, BLOCKED, f"access blocked by llmpulse action {g.action_id} ({scope})", "action_blocked"
                    ), []
            per = self.limits.get(scope)
            if per:
                lims = per.get(value)
                if lims:
                    now = time.monotonic()
                    for lim in lims:
                        if now_wall >= lim.until:
                            continue
                        wait = lim.check(now)
                        if wait > 0:
                            secs = max(1, math.ceil(wait))
                            what = []
                            if lim.rpm:
                                what.append(f"{lim.rpm} requests")
                            if lim.tpm:
                                what.append(f"{lim.tpm} tokens")
                            headers = {
                                "Retry-After": str(secs),
                                "retry-after-ms": str(max(1, math.ceil(wait * 1000))),
                            }
                            if lim.rpm:
                                headers["x-ratelimit-limit-requests"] = str(lim.rpm)
                                headers["x-ratelimit-remaining-requests"] = "0"
                                headers["x-ratelimit-reset-requests"] = f"{secs}s"
                            if lim.tpm:
                                headers["x-ratelimit-limit-tokens"] = str(lim.tpm)
                            return Refusal(
                                429,
                                RATE_LIMITED,
                                f"Rate limit reached ({' and '.join(what)} per minute, llmpulse action "
                                f"{lim.action_id}); retry after {secs}s",
                                "rate_limit_exceeded",
                                headers,
                            ), []
                        if lim.tokens is not None:
                            charge.append(lim)
        return None, charge

    def route(self, model: str) -> Gate | None:
        g = self.routes.get(model)
        if g is None or time.time() >= g.until:
            return None
        return g

    def cut(self, upstream: str, provider: str) -> Gate | None:
        g = self.cuts.get(upstream) or self.cuts.get(provider)
        if g is None or time.time() >= g.until:
            return None
        return g


def _until(ev: ActionEvent) -> float:
    return ev.expires_at.timestamp() if ev.expires_at is not None else math.inf


def build(active: list[ActionEvent], previous: dict[str, Limit] | None = None) -> tuple[Enforcement, dict[str, Limit]]:
    """A snapshot of the applied actions; rate-limit state is kept from `previous` by action id."""
    prev = previous or {}
    snap = Enforcement()
    kept: dict[str, Limit] = {}
    for ev in active:
        until = _until(ev)
        if ev.kind == "rate_limit":
            scope, value = next(iter(ev.target.items()), (None, None))
            if scope not in SCOPES or not value:
                continue
            rpm = ev.params.get("requests_per_minute")
            tpm = ev.params.get("tokens_per_minute")
            lim = prev.get(ev.action_id)
            if lim is None or lim.rpm != rpm or lim.tpm != tpm:
                lim = Limit(
                    ev.action_id, until, rpm, tpm,
                    Bucket(int(rpm)) if rpm else None,
                    Bucket(int(tpm)) if tpm else None,
                )
            lim.until = until
            kept[ev.action_id] = lim
            snap.limits.setdefault(scope, {}).setdefault(value, []).append(lim)
        elif ev.kind == "block":
            scope, value = next(iter(ev.target.items()), (None, None))
            if scope not in SCOPES or not value:
                continue
            snap.blocks.setdefault(scope, {})[value] = Gate(ev.action_id, until)
        elif ev.kind == "fallback":
            model = ev.target.get("model")
            if not model:
                continue
            snap.routes[model] = Gate(
                ev.action_id, until, model=ev.params.get("fallback_model"), upstream=ev.params.get("fallback_upstream")
            )
        elif ev.kind == "open_circuit":
            up = ev.target.get("upstream")
            if up:
                snap.cuts[up] = Gate(ev.action_id, until, upstream=up)
    snap.any = bool(snap.limits or snap.blocks or snap.routes or snap.cuts)
    return snap, kept


class ProxyActions:
    """The proxy's view of the active actions, kept current by a follower thread."""

    def __init__(self) -> None:
        self.snapshot = Enforcement()
        self._limits: dict[str, Limit] = {}
        self._follower: ActionFollower | None = None
        self.updates = 0

    def update(self, store: ActionStore) -> None:
        snap, self._limits = build(store.active(), self._limits)
        self.snapshot = snap  # one reference swap: handlers see the old or the new snapshot
        self.updates += 1
        log.info(
            "proxy actions: %d rate limits, %d blocks, %d fallbacks, %d open circuits",
            sum(len(v) for per in snap.limits.values() for v in per.values()),
            sum(len(v) for v in snap.blocks.values()), len(snap.routes), len(snap.cuts),
        )

    def follow(self, settings: Settings, bootstrap: str | None = None) -> None:
        from llmpulse.actions.state import ActionFollower

        self._follower = ActionFollower(settings, self.update, bootstrap=bootstrap).start()

    def stop(self) -> None:
        if self._follower is not None:
            self._follower.stop()
            self._follower = None
