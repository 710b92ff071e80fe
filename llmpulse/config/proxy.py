"""Config section `proxy`: the monitoring proxy (OpenAI-compatible and Anthropic
Messages APIs) and its upstreams.

An upstream is a base URL ending in ``/v1`` (the one you would give the OpenAI
client, e.g. ``https://api.openai.com/v1``; for Anthropic ``https://api.anthropic.com/v1``):
a request for ``/v1/<rest>`` goes to ``<base_url>/<rest>``. It is chosen by path
prefix (``/<prefix>/v1/...``, prefix removed before forwarding) first, then by the
body's model name (glob patterns in `models`), else the `default_upstream` (or the
first upstream without patterns). Without a `proxy.upstreams` entry in the config,
``claude-*`` models go to Anthropic and everything else to OpenAI.

Example::

    proxy:
      port: 8787
      upstreams:
        - {name: openai, base_url: "https://api.openai.com/v1", models: ["gpt-*", "o*"]}
        - {name: anthropic, base_url: "https://api.anthropic.com/v1", provider: anthropic, models: ["claude-*"]}
        - {name: local, base_url: "http://127.0.0.1:8000/v1", provider: vllm, path_prefix: /local}
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator, model_validator

from llmpulse.config.base import Section

Seconds = Annotated[float, Field(gt=0, le=86_400)]


class UpstreamConfig(Section):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")]
    base_url: str = Field(
        description="base URL ending in /v1, e.g. https://api.openai.com/v1 or https://api.anthropic.com/v1"
    )
    provider: Annotated[str, Field(min_length=1, max_length=128)] = Field(
        default="openai",
        description="recorded as CallEvent.provider; left unset: anthropic for /v1/messages calls, else openai",
    )
    models: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(
        default_factory=list, description="model name glob patterns routed here"
    )
    path_prefix: str | None = Field(
        default=None, description="requests to /<prefix>/v1/... go here (prefix removed)"
    )
    connect_timeout_s: Seconds = 5.0
    read_timeout_s: Seconds = Field(default=300.0, description="longest wait for the next bytes")
    total_timeout_s: Seconds = Field(default=600.0, description="longest whole request (non-streamed)")
    max_connections: Annotated[int, Field(ge=0, le=100_000)] = Field(
        default=1000, description="open connections to this upstream (0 = unlimited)"
    )
    retries: Annotated[int, Field(ge=0, le=10)] = Field(
        default=2, description="retries of non-streamed requests on connection errors and 502/503/504"
    )
    retry_backoff_s: Annotated[float, Field(ge=0, le=60)] = 0.2
    retry_backoff_max_s: Annotated[float, Field(ge=0, le=300)] = 5.0
    circuit_failures: Annotated[int, Field(ge=1, le=10_000)] = Field(
        default=5, description="consecutive failures that open the circuit breaker"
    )
    circuit_reset_s: Seconds = Field(default=10.0, description="how long the circuit stays open")

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")) or len(v) < 10:
            raise ValueError("expected an http(s):// base URL")
        return v.rstrip("/")

    @field_validator("path_prefix")
    @classmethod
    def _prefix(cls, v: str | None) -> str | None:
        if v is None:
            return None
        v = "/" + v.strip("/")
        if v == "/" or v == "/v1":
            raise ValueError("path_prefix must name a path segment other than / and /v1")
        return v


def _default_upstreams() -> list[UpstreamConfig]:
    return [
        UpstreamConfig(name="openai", base_url="https://api.openai.com/v1"),
        UpstreamConfig(
            name="anthropic", base_url="https://api.anthropic.com/v1", provider="anthropic", models=["claude-*"]
        ),
    ]


class ProxyConfig(Section):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = Field(default=8787, description="0 picks a free port")
    upstreams: Annotated[list[UpstreamConfig], Field(min_length=1)] = Field(
        default_factory=_default_upstreams
    )
    default_upstream: str | None = Field(
        default=None, description="upstream for requests no prefix or pattern matches"
    )
    max_body_bytes: Annotated[int, Field(ge=1024, le=1 << 30)] = 64 * 1024 * 1024
    queue_size: Annotated[int, Field(ge=1, le=10_000_000)] = Field(
        default=100_000, description="events held in memory on their way to Kafka"
    )
    spool_max_bytes: Annotated[int, Field(ge=0)] = Field(
        default=1 << 30, description="spool file limit while Kafka is unreachable; past it events are dropped"
    )
    delivery_timeout_s: Annotated[float, Field(gt=0, le=3600)] = Field(
        default=15.0, description="an event not delivered within this goes to the spool"
    )
    batch_max_events: Annotated[int, Field(ge=1, le=10_000)] = Field(
        default=200, description="call events per Kafka message (a batch envelope per model); 1 = one message per call"
    )
    batch_linger_ms: Annotated[float, Field(ge=0, le=60_000)] = Field(
        default=50.0, description="longest wait of a call event for its batch to fill; 0 = one message per call"
    )
    broker_retry_s: Annotated[float, Field(gt=0, le=600)] = Field(
        default=2.0, description="how often to check whether an unreachable broker is back"
    )
    inject_stream_usage: bool = Field(
        default=True,
        description="ask upstreams for the usage chunk of streams (hidden from clients that did not ask)",
    )
    trust_body_user: bool = Field(default=True, description="use the body's `user` field when no header names one")
    default_app: Annotated[str, Field(min_length=1, max_length=128)] = "default"

    @model_validator(mode="after")
    def _check_upstreams(self) -> ProxyConfig:
        names = [u.name for u in self.upstreams]
        if len(set(names)) != len(names):
            raise ValueError("upstream names must be unique")
        prefixes = [u.path_prefix for u in self.upstreams if u.path_prefix]
        if len(set(prefixes)) != len(prefixes):
            raise ValueError("upstream path prefixes must be unique")
        if self.default_upstream is not None and self.default_upstream not in names:
            raise ValueError(f"default_upstream {self.default_upstream!r} is not an upstream name")
        return self
