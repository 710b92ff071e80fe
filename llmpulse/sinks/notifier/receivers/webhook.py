"""The generic webhook: a JSON POST signed with HMAC-SHA256.

Headers: ``X-LLMPulse-Timestamp`` (unix seconds), ``X-LLMPulse-Signature``
(``sha256=<hex of HMAC-SHA256(secret, "<timestamp>." + body)>``) and
``X-LLMPulse-Notification-Id`` (the same for a retried or replayed notification, so a
receiver can drop duplicates). `verify_signature` is what a receiving service runs.

Every message of one incident carries the same ``incident_id`` (its aggregation group);
a change to an incident already paged (escalation, an alert joining or resolving) comes
as ``"update": true`` with ``incident_notification_id`` (the page's notification id) and
``changes``, so a machine consumer (PagerDuty-style) updates that incident instead of
opening another.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from dataclasses import replace

import aiohttp

from llmpulse.config.notify import WebhookReceiverConfig
from llmpulse.sinks.notifier.blocks import webhook_payload
from llmpulse.sinks.notifier.grouping import Notification
from llmpulse.sinks.notifier.receivers.base import (
    DeliveryError,
    MessageRef,
    retry_after_of,
    secret_from_env,
)

SIGNATURE_HEADER = "X-LLMPulse-Signature"
TIMESTAMP_HEADER = "X-LLMPulse-Timestamp"
ID_HEADER = "X-LLMPulse-Notification-Id"


def sign(secret: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify_signature(
    secret: str,
    body: bytes,
    timestamp: str,
    signature: str,
    tolerance_s: float = 300.0,
    now: float | None = None,
) -> bool:
    """True when `signature` is this body's signature with `secret`, made within the tolerance."""
    try:
        ts = float(timestamp)
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - ts) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


class WebhookReceiver:
    kind = "webhook"

    def __init__(
        self,
        name: str,
        cfg: WebhookReceiverConfig,
        dashboard_url: str,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.url = cfg.url
        self.timeout = cfg.timeout_s
        self.dashboard_url = dashboard_url
        self._secret = (
            secret_from_env(environ, cfg.secret_env, name, "webhook signing secret")
            if cfg.secret_env
            else None
        )
        self._session: aiohttp.ClientSession | None = None

    async def send(self, notification: Notification) -> MessageRef:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        first = notification.message_ref.get("notification_id")
        if notification.update and not first:
            notification = replace(notification, update=False)  # nothing to update: a new message
        # the handle: the incident's page this message updates, else this message
        page_id = first if notification.update and first else notification.notification_id
        handle: MessageRef = {"notification_id": page_id}
        body = json.dumps(webhook_payload(notification, self.dashboard_url), separators=(",", ":")).encode()
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "llmpulse-notifier",
            TIMESTAMP_HEADER: timestamp,
            ID_HEADER: notification.notification_id,
        }
        if self._secret is not None:
            headers[SIGNATURE_HEADER] = sign(self._secret, timestamp, body)
        try:
            async with self._session.post(self.url, data=body, headers=headers) as resp:
                text = (await resp.text())[:200]
                if 200 <= resp.status < 300:
                    return handle
                retry_after = retry_after_of(dict(resp.headers))
                permanent = 400 <= resp.status < 500 and resp.status not in (408, 409, 425, 429)
                raise DeliveryError(
                    f"webhook answered HTTP {resp.status}: {text}",
                    retry_after=retry_after,
                    permanent=permanent,
                )
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise DeliveryError(f"webhook unreachable: {type(exc).__name__}: {exc}") from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
