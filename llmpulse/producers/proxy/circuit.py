"""A per-upstream circuit breaker: fail fast while an upstream is down.

closed --(N consecutive failures)--> open --(reset_s elapsed)--> half-open: one trial
request passes; its success closes the circuit, its failure opens it again.
Failures are connection errors, timeouts and 502/503/504 answers.
"""

from __future__ import annotations

import time


class CircuitBreaker:
    def __init__(self, failures: int, reset_s: float) -> None:
        self.threshold = failures
        self.reset_s = reset_s
        self.consecutive = 0
        self.opened_at: float | None = None
        self._trial = False
        self.opens = 0

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half-open" if time.monotonic() - self.opened_at >= self.reset_s else "open"

    def allow(self) -> bool:
        """May a request go to the upstream now? (Reserves the half-open trial.)"""
        if self.opened_at is None:
            return True
        if time.monotonic() - self.opened_at < self.reset_s or self._trial:
            return False
        self._trial = True
        return True

    def success(self) -> None:
        self.consecutive = 0
        self.opened_at = None
        self._trial = False

    def failure(self) -> None:
        self.consecutive += 1
        if self._trial or (self.opened_at is None and self.consecutive >= self.threshold):
            if self.opened_at is None or self._trial:
                self.opens += 1
            self.opened_at = time.monotonic()
        self._trial = False

    def release(self) -> None:
        """The trial request ended without telling (e.g. the client left): allow another."""
        self._trial = False
