"""Slack through slack-sdk: an incoming webhook, or chat.postMessage with a bot token.

The webhook URL and the token come from environment variables the config names.
slack-sdk's own retries are off: delivery.py retries, honouring Retry-After.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

import aiohttp
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient
from slack_sdk.webhook.async_client import AsyncWebhookClient

from llmpulse.config.notify import SlackReceiverConfig
from llmpulse.schemas.base import utc_now
from llmpulse.sinks.notifier.blocks import slack_message
from llmpulse.sinks.notifier.grouping import Notification
from llmpulse.sinks.notifier.receivers.base import DeliveryError, retry_after_of, secret_from_env

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

    async def send(self, notification: Notification, now: datetime | None = None) -> None:
        text, blocks = slack_message(notification, self.dashboard_url, now or utc_now())
        try:
            if self._webhook is not None:
                await self._send_webhook(text, blocks)
            else:
                await self._send_web(text, blocks)
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

    async def _send_web(self, text: str, blocks: list[dict[str, object]]) -> None:
        assert self._web is not None and self.channel is not None
        try:
            await self._web.chat_postMessage(channel=self.channel, text=text, blocks=blocks)
        except SlackApiError as exc:
            resp = exc.response
            status = int(getattr(resp, "status_code", 0) or 0)
            data = getattr(resp, "data", None)
            error = str(data.get("error", "")) if isinstance(data, dict) else ""
            headers = getattr(resp, "headers", None)
            retry_after = retry_after_of(dict(headers)) if headers else None
            transient = status == 429 or status >= 500 or error in TRANSIENT_ERRORS
            raise DeliveryError(
                f"Slack chat.postMessage failed: HTTP {status} {error or '(no error code)'}",
                retry_after=retry_after,
                permanent=not transient,
            ) from None

    async def close(self) -> None:
        if self._web is not None and self._web.session is not None:
            await self._web.session.close()
        if self._webhook is not None and self._webhook.session is not None:
            await self._webhook.session.close()
