"""Slack through slack-sdk: an incoming webhook, or chat.postMessage with a bot token.

The webhook URL and the token come from environment variables the config names.
slack-sdk's own retries are off: delivery.py retries, honouring Retry-After.

With a bot token an incident is one message kept current: its page is chat.postMessage
(the handle kept is the response's channel and ts); an update (`Notification.update`) is
chat.update of that message with the new text and blocks, plus a reply in its thread
saying what changed, which is history without pinging the channel. When that message is
gone (deleted, or not editable any more) or the handle is missing, the update is posted
as a new message, whose handle then stands for the incident. An incoming webhook cannot
edit what it posted: there an update is a new message, and no handle is kept.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime

import aiohttp
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient
from slack_sdk.webhook.async_client import AsyncWebhookClient

from llmpulse.config.notify import SlackReceiverConfig
from llmpulse.schemas.base import utc_now
from llmpulse.sinks.notifier.blocks import slack_message, thread_reply
from llmpulse.sinks.notifier.grouping import Notification
from llmpulse.sinks.notifier.receivers.base import (
    DeliveryError,
    MessageRef,
    retry_after_of,
    secret_from_env,
)

log = logging.getLogger(__name__)

# Web API errors worth retrying; every other `ok: false` error is permanent.
TRANSIENT_ERRORS = {
    "ratelimited",
    "rate_limited",
    "internal_error",
    "fatal_error",
    "service_unavailable",
    "request_timeout",
    "team_added_to_org",
}
# chat.update errors that mean the incident's message cannot be edited: post a new one
GONE_ERRORS = {"message_not_found", "cant_update_message", "edit_window_closed"}


def slack_error(exc: SlackApiError) -> str:
    data = getattr(exc.response, "data", None)
    return str(data.get("error", "")) if isinstance(data, dict) else ""


def web_api_error(method: str, exc: SlackApiError) -> DeliveryError:
    """A Web API failure as a DeliveryError: transient (429, 5xx, Slack's own hiccups) or not."""
    resp = exc.response
    status = int(getattr(resp, "status_code", 0) or 0)
    error = slack_error(exc)
    headers = getattr(resp, "headers", None)
    retry_after = retry_after_of(dict(headers)) if headers else None
    transient = status == 429 or status >= 500 or error in TRANSIENT_ERRORS
    return DeliveryError(
        f"Slack {method} failed: HTTP {status} {error or '(no error code)'}",
        retry_after=retry_after,
        permanent=not transient,
    )


class SlackReceiver:
    kind = "slack"

    def __init__(
        self,
        name: str,
        cfg: SlackReceiverConfig,
        dashboard_url: str,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.dashboard_url = dashboard_url
        self.channel = cfg.channel
        timeout = max(1, int(cfg.timeout_s))
        self._webhook: AsyncWebhookClient | None = None
        self._web: AsyncWebClient | None = None
        if cfg.webhook_url_env:
            url = secret_from_env(environ, cfg.webhook_url_env, name, "Slack incoming-webhook URL")
            self._webhook = AsyncWebhookClient(url, timeout=timeout, retry_handlers=[])
        else:
            assert cfg.token_env is not None
            token = secret_from_env(environ, cfg.token_env, name, "Slack bot token")
            self._web = AsyncWebClient(
                token=token, base_url=cfg.base_url, timeout=timeout, retry_handlers=[]
            )

    async def send(self, notification: Notification, now: datetime | None = None) -> MessageRef | None:
        text, blocks = slack_message(notification, self.dashboard_url, now or utc_now())
        try:
            if self._webhook is not None:
                await self._send_webhook(text, blocks)
                return None
            ref = notification.message_ref
            if notification.update and ref.get("channel") and ref.get("ts"):
                edited = await self._update_web(ref["channel"], ref["ts"], text, blocks, thread_reply(notification))
                if edited is not None:
                    return edited
            return await self._send_web(text, blocks)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise DeliveryError(f"Slack unreachable: {type(exc).__name__}: {exc}") from None

    async def _send_webhook(self, text: str, blocks: list[dict[str, object]]) -> None:
        assert self._webhook is not None
        resp = await self._webhook.send(text=text, blocks=blocks)
        if resp.status_code == 200:
            return
        body = (resp.body or "")[:200]
        if resp.status_code == 429 or resp.status_code >= 500:
            raise DeliveryError(
                f"Slack webhook answered HTTP {resp.status_code}: {body}",
                retry_after=retry_after_of(resp.headers) if resp.status_code == 429 else None,
            )
        raise DeliveryError(f"Slack webhook answered HTTP {resp.status_code}: {body}", permanent=True)

    async def _send_web(self, text: str, blocks: list[dict[str, object]]) -> MessageRef:
        assert self._web is not None and self.channel is not None
        try:
            resp = await self._web.chat_postMessage(channel=self.channel, text=text, blocks=blocks)
        except SlackApiError as exc:
            raise web_api_error("chat.postMessage", exc) from None
        ts = resp.get("ts")
        return {"channel": str(resp.get("channel") or self.channel), "ts": str(ts)} if ts else {}

    async def _update_web(
        self, channel: str, ts: str, text: str, blocks: list[dict[str, object]], reply: str
    ) -> MessageRef | None:
        """Edit the incident's message and reply in its thread; None when it cannot be edited."""
        assert self._web is not None
        try:
            await self._web.chat_update(channel=channel, ts=ts, text=text, blocks=blocks)
        except SlackApiError as exc:
            if slack_error(exc) in GONE_ERRORS:
                log.warning("Slack message %s in %s cannot be edited (%s): posting a new one", ts, channel, slack_error(exc))
                return None
            raise web_api_error("chat.update", exc) from None
        try:
            await self._web.chat_postMessage(channel=channel, thread_ts=ts, text=reply)
        except SlackApiError as exc:
            err = web_api_error("chat.postMessage (thread reply)", exc)
            if not err.permanent:
                raise err from None  # retried: the edit again (the same), then the reply
            # the message itself is current; the thread lacks one line of history
            log.warning("Slack thread reply to %s in %s failed: %s", ts, channel, err)
        return {"channel": channel, "ts": ts}

    async def close(self) -> None:
        if self._web is not None and self._web.session is not None:
            await self._web.session.close()
        if self._webhook is not None and self._webhook.session is not None:
            await self._webhook.session.close()
