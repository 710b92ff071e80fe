"""Config section `actions`: what to do when an alert fires (issue 10).

Each action rule matches alerts by rule name, severity and dimensions (shell-style
patterns) and names one action. Built-in actions are enforced by every proxy from the
compacted `actions` topic; a hook runs in the action engine (`llmpulse actions run`).

Example::

    actions:
      rules:
        - name: throttle_abusive_keys
          match: {rule: key_rate, severity: [warning, critical]}
          action: rate_limit
          scope: api_key_hash          # the alert dimension (or root cause) naming the target
          requests_per_minute: 20
          duration: 15m
        - name: gpt4_fallback
          match: {rule: success_rate, dimensions: {model: "gpt-4*"}}
          action: fallback
          fallback_model: gpt-4o-mini
          approve: true                # pending until `llmpulse actions approve ID`
        - name: page_oncall
          match: {rule: "*", severity: [critical]}
          action: hook
          hook: {command: ["/usr/local/bin/page", "--team", "llm"], timeout: 10s}
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from llmpulse.config.base import Section

ActionKindName = Literal["rate_limit", "block", "fallback", "open_circuit", "hook"]
Scope = Literal["api_key_hash", "user", "app"]

_DURATION = re.compile(r"^(?:\d+(?:\.\d+)?[smhdw]?)+$")
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw]?)")
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}


def duration_seconds(value: object) -> float:
    """Seconds from a number or text like `90s`, `15m`, `2h`, `1h30m` (a bare number is seconds)."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 90s, 15m, 2h")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        text = value.replace(" ", "")
        if text and _DURATION.match(text):
            return sum(float(n) * _UNITS[u] for n, u in _PART.findall(text))
    raise ValueError(f"invalid duration {value!r}: expected e.g. 90s, 15m, 2h, 1h30m")


def _bounded(v: object, lo: float, hi: float) -> float:
    s = duration_seconds(v)
    if not lo < s <= hi:
        raise ValueError(f"duration must be more than {lo:g}s and at most {hi:g}s")
    return s


class AlertMatch(Section):
    rule: Annotated[str, Field(min_length=1, max_length=256)] = Field(
        default="*", description="alert rule name pattern (shell-style)"
    )
    severity: list[Literal["warning", "critical"]] = Field(default=["warning", "critical"], min_length=1)
    dimensions: dict[str, str] = Field(
        default_factory=dict, description="dimension -> value pattern; the alert must have each"
    )


class HookConfig(Section):
    url: str | None = Field(default=None, description="POST the alert JSON here")
    command: list[Annotated[str, Field(min_length=1)]] | None = Field(
        default=None, description="argv of a command run with the alert JSON on stdin"
    )
    headers: dict[str, str] = Field(default_factory=dict, description="extra HTTP headers for `url`")
    timeout: float = Field(default=10.0, description="seconds (or 10s, 1m) before the hook counts as failed")

    @field_validator("timeout", mode="before")
    @classmethod
    def _timeout(cls, v: object) -> float:
        s = duration_seconds(v)
        if not 0 < s <= 600:
            raise ValueError("hook timeout must be in (0, 600] seconds")
        return s

    @field_validator("url")
    @classmethod
    def _http(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("hook url must be http(s)://")
        return v

    @model_validator(mode="after")
    def _one(self) -> HookConfig:
        if (self.url is None) == (self.command is None):
            raise ValueError("a hook needs exactly one of `url` or `command`")
        return self


class ActionRule(Section):
    name: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")]
    match: AlertMatch = Field(default_factory=AlertMatch)
    action: ActionKindName
    approve: bool = Field(default=False, description="wait as pending until approved or rejected")
    duration: float = Field(default=900.0, description="undo after this long (seconds, or 15m, 2h)")
    undo_on_resolve: bool = Field(default=True, description="undo early when the alert resolves")
    approval_timeout: float | None = Field(
        default=None, description="pending actions expire after this (default: actions.approval_timeout)"
    )
    # rate_limit / block
    scope: Scope = Field(default="api_key_hash", description="what to limit or block (rate_limit, block)")
    requests_per_minute: Annotated[int, Field(ge=0)] | None = None
    tokens_per_minute: Annotated[int, Field(ge=0)] | None = None
    # fallback
    model: str | None = Field(
        default=None, description="model to reroute (fallback); default: the alert's `model` dimension or root cause"
    )
    fallback_model: str | None = None
    fallback_upstream: str | None = Field(default=None, description="a proxy upstream name (fallback)")
    # open_circuit
    upstream: str | None = Field(
        default=None,
        description="proxy upstream name or provider to cut off (open_circuit); default: the alert's `provider`",
    )
    hook: HookConfig | None = None

    @field_validator("duration", mode="before")
    @classmethod
    def _dur(cls, v: object) -> float:
        return _bounded(v, 0, 30 * 86400)

    @field_validator("approval_timeout", mode="before")
    @classmethod
    def _appr(cls, v: object) -> float | None:
        return None if v is None else _bounded(v, 0, 30 * 86400)

    @model_validator(mode="after")
    def _complete(self) -> ActionRule:
        a = self.action
        if a == "rate_limit" and not self.requests_per_minute and not self.tokens_per_minute:
            raise ValueError("a rate_limit action needs requests_per_minute and/or tokens_per_minute (> 0)")
        if a == "fallback" and not self.fallback_model and not self.fallback_upstream:
            raise ValueError("a fallback action needs fallback_model and/or fallback_upstream")
        if a == "hook" and self.hook is None:
            raise ValueError("a hook action needs `hook: {url: ...}` or `hook: {command: [...]}`")
        if a != "hook" and self.hook is not None:
            raise ValueError("`hook` is only for action: hook")
        return self


class ActionsConfig(Section):
    rules: list[ActionRule] = Field(default_factory=list)
    approval_timeout: float = Field(
        default=3600.0, description="pending actions expire after this (seconds, or 30m, 1h)"
    )
    engine_group: Annotated[str, Field(min_length=1, max_length=128)] = Field(
        default="llmpulse-actions", description="consumer group of the action engine on the alerts topic"
    )
    tick_s: Annotated[float, Field(gt=0, le=60)] = Field(
        default=0.5, description="how often the engine checks expiries and approvals"
    )
    max_alert_age: float = Field(
        default=600.0,
        description="firing alerts older than this when the engine reads them (a backlog) take no action",
    )
    enforce_in_proxy: bool = Field(default=True, description="proxies follow the actions topic and enforce it")

    @field_validator("approval_timeout", "max_alert_age", mode="before")
    @classmethod
    def _appr(cls, v: object) -> float:
        return _bounded(v, 0, 30 * 86400)

    @model_validator(mode="after")
    def _unique(self) -> ActionsConfig:
        names = [r.name for r in self.rules]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"action rule names must be unique: {', '.join(sorted(dup))}")
        return self
