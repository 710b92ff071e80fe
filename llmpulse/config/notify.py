"""Config section `notify`: receivers, routes, Alertmanager-style grouping, delivery.

Secrets (a Slack webhook URL, a bot token, a webhook signing secret) never appear in
the file: a receiver names the environment variable that holds them, for example
``LLMPULSE_SECRET_SLACK_WEBHOOK_URL`` (the config loader skips ``LLMPULSE_SECRET_*``).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from llmpulse.config.base import Section

EnvName = Annotated[
    str,
    Field(
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        max_length=200,
        description="name of an environment variable (the secret itself never goes in the config)",
    ),
]
Seconds = Annotated[float, Field(gt=0, le=7 * 86400)]
ReceiverName = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.\-]+$")]


class SlackReceiverConfig(Section):
    """Slack through slack-sdk: an incoming webhook, or a bot token and a channel."""

    type: Literal["slack"]
    webhook_url_env: EnvName | None = Field(
        default=None, description="env var holding the incoming-webhook URL"
    )
    token_env: EnvName | None = Field(default=None, description="env var holding the bot token (xoxb-...)")
    channel: str | None = Field(default=None, max_length=200, description="channel for the bot token")
    base_url: str = Field(default="https://slack.com/api/", description="Slack Web API base URL")
    timeout_s: Seconds = 10.0

    @model_validator(mode="after")
    def _one_way(self) -> SlackReceiverConfig:
        if (self.webhook_url_env is None) == (self.token_env is None):
            raise ValueError("set exactly one of webhook_url_env or token_env")
        if self.token_env is not None and not self.channel:
            raise ValueError("token_env needs a channel")
        return self


class WebhookReceiverConfig(Section):
    """A JSON POST signed with HMAC-SHA256 (header X-LLMPulse-Signature)."""

    type: Literal["webhook"]
    url: str = Field(pattern=r"^https?://", max_length=2000)
    secret_env: EnvName | None = Field(
        default=None, description="env var holding the HMAC secret; unsigned when unset"
    )
    timeout_s: Seconds = 10.0


class LogReceiverConfig(Section):
    """One log line per notification (logger llmpulse.notify)."""

    type: Literal["log"]


ReceiverConfig = Annotated[
    SlackReceiverConfig | WebhookReceiverConfig | LogReceiverConfig, Field(discriminator="type")
]


class RouteConfig(Section):
    """Which alerts go to which receivers; patterns are shell-style (`*`, `?`)."""

    name: Annotated[str, Field(max_length=100, pattern=r"^[A-Za-z0-9_.\-]*$")] = ""
    receivers: Annotated[list[ReceiverName], Field(min_length=1)]
    severity: list[Literal["warning", "critical"]] | None = Field(
        default=None, description="severities this route takes; all when unset"
    )
    rules: list[str] | None = Field(default=None, description="rule name patterns; all when unset")
    dimensions: dict[str, str] = Field(
        default_factory=dict, description="dimension name -> value pattern; the alert must have each"
    )
    continue_matching: bool = Field(
        default=False, description="also try the routes after this one when it matches"
    )
    group_by: list[str] | None = None
    group_wait_s: Seconds | None = None
    group_interval_s: Seconds | None = None
    repeat_interval_s: Seconds | None = None


def _default_receivers() -> dict[str, SlackReceiverConfig | WebhookReceiverConfig | LogReceiverConfig]:
    return {"log": LogReceiverConfig(type="log")}


class NotifyConfig(Section):
    receivers: dict[ReceiverName, ReceiverConfig] = Field(default_factory=_default_receivers)
    routes: list[RouteConfig] = Field(default_factory=list)
    default_receivers: list[ReceiverName] = Field(
        default_factory=lambda: ["log"],
        description="receivers of alerts no route takes ('log' is built in)",
    )
    group_by: list[str] = Field(
        default_factory=lambda: ["incident"],
        description=(
            "incident (default: what fires while an incident is open joins it, one page per"
            " incident), rule, severity, metric or dimension names; ['...'] groups by everything"
        ),
    )
    group_wait_s: Seconds = 30.0
    group_interval_s: Seconds = 300.0
    repeat_interval_s: Seconds = 4 * 3600.0
    send_resolved: bool = True
    dashboard_url: str = Field(default="http://127.0.0.1:8080", max_length=2000)
    retry_initial_s: Seconds = 1.0
    retry_max_s: Seconds = 60.0
    consumer_group: Annotated[str, Field(min_length=1, max_length=200)] = "llmpulse-notify"
    commit_interval_s: Seconds = 0.5
    web_port: Annotated[int, Field(ge=0, le=65535)] = 0

    @field_validator("dashboard_url")
    @classmethod
    def _strip_slash(cls, v: str) -> str:
        return v.rstrip("/")

    @model_validator(mode="after")
    def _known_receivers(self) -> NotifyConfig:
        named = [*self.default_receivers]
        for route in self.routes:
            named.extend(route.receivers)
        names = [r.name for r in self.routes if r.name]
        if len(set(names)) != len(names) or "default" in names:
            raise ValueError("route names must be unique and not 'default'")
        if "log" in named and "log" not in self.receivers:
            self.receivers["log"] = LogReceiverConfig(type="log")  # built in
        unknown = sorted({n for n in named if n not in self.receivers})
        if unknown:
            raise ValueError(
                f"unknown receiver(s) {', '.join(unknown)}; defined: {', '.join(sorted(self.receivers))}"
            )
        return self
