"""What every receiver is: `send(notification)`, raising DeliveryError when it did not land.

`send` returns the receiver's handle of the message it posted or edited (`MessageRef`:
Slack's channel and ts, the webhook's and the log's notification id), or None when it
cannot edit what it posted (a Slack incoming webhook). The handle goes into the delivery
log, so the incident's later updates edit that message, after a restart too
(`Notification.update`, with the handle in `Notification.message_ref`). A receiver given
an update whose handle it cannot use posts a new message instead and returns its handle.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Protocol

from llmpulse.errors import LLMPulseError
from llmpulse.sinks.notifier.grouping import Notification


class DeliveryError(Exception):
    """A failed send. `retry_after` (seconds) when the receiver said when to come back;
    `permanent` when retrying cannot help (bad credentials, unknown channel, bad request)."""

    def __init__(self, message: str, *, retry_after: float | None = None, permanent: bool = False) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.permanent = permanent


MessageRef = dict[str, str]


class Receiver(Protocol):
    name: str
    kind: str

    async def send(self, notification: Notification) -> MessageRef | None: ...

    async def close(self) -> None: ...


def secret_from_env(environ: Mapping[str, str] | None, name: str, receiver: str, what: str) -> str:
    env = os.environ if environ is None else environ
    value = env.get(name, "").strip()
    if not value:
        raise LLMPulseError(
            f"receiver {receiver!r}: environment variable {name} (the {what}) is not set"
        )
    return value


def retry_after_of(headers: Mapping[str, str] | None) -> float | None:
    if not headers:
        return None
    raw = None
    for k, v in headers.items():
        if k.lower() == "retry-after":
            raw = v
            break
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        return None
