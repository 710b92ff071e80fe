"""Upstreams and routing: path prefix first, then model-name pattern, then the default."""

from __future__ import annotations

import fnmatch
import re

import aiohttp

from llmpulse.config.proxy import ProxyConfig, UpstreamConfig
from llmpulse.producers.proxy.circuit import CircuitBreaker

OPERATIONS = {
    "/chat/completions": "chat",
    "/completions": "completion",
    "/embeddings": "embedding",
    "/responses": "responses",
    "/messages": "chat",  # Anthropic Messages
}
ANTHROPIC_MESSAGES = "/messages"


def operation_of(rest: str) -> str:
    """chat | completion | embedding | responses | other, from the path after /v1."""
    return OPERATIONS.get(rest, "other")


def is_anthropic(rest: str) -> bool:
    """Whether the path after /v1 is Anthropic's Messages API (``POST /v1/messages``)."""
    return rest == ANTHROPIC_MESSAGES


class Upstream:
    """One configured upstream: its HTTP client session, timeouts and circuit breaker."""

    def __init__(self, cfg: UpstreamConfig) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.base_url = cfg.base_url
        self.provider = cfg.provider
        # a provider left unset is named after the API a call used (see provider_for)
        self.provider_set = "provider" in cfg.model_fields_set
        self.circuit = CircuitBreaker(cfg.circuit_failures, cfg.circuit_reset_s)
        self.timeout = aiohttp.ClientTimeout(
            total=cfg.total_timeout_s, connect=cfg.connect_timeout_s, sock_read=cfg.read_timeout_s
        )
        # a stream may last long: no total limit, only connect and between-bytes limits
        self.stream_timeout = aiohttp.ClientTimeout(
            total=None, connect=cfg.connect_timeout_s, sock_read=cfg.read_timeout_s
        )
        self._patterns = [re.compile(fnmatch.translate(p)) for p in cfg.models]
        self.session: aiohttp.ClientSession | None = None

    def provider_for(self, anthropic: bool) -> str:
        """CallEvent.provider of a call through this upstream: the configured provider,
        else ``anthropic`` for Anthropic Messages calls and the default (``openai``) for
        the rest."""
        return "anthropic" if anthropic and not self.provider_set else self.provider

    def matches(self, model: str) -> bool:
        return any(rx.match(model) for rx in self._patterns)

    async def open(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self.cfg.max_connections, limit_per_host=0, ttl_dns_cache=300, keepalive_timeout=30
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=self.timeout,
            auto_decompress=True,
            skip_auto_headers=("User-Agent",),
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None


class Router:
    def __init__(self, cfg: ProxyConfig) -> None:
        self.upstreams = [Upstream(u) for u in cfg.upstreams]
        self._by_prefix = {u.cfg.path_prefix: u for u in self.upstreams if u.cfg.path_prefix}
        self._by_model = [u for u in self.upstreams if u.cfg.models]
        by_name = {u.name: u for u in self.upstreams}
        self.by_name = by_name
        if cfg.default_upstream is not None:
            self.default: Upstream | None = by_name[cfg.default_upstream]
        else:
            plain = [u for u in self.upstreams if not u.cfg.models and not u.cfg.path_prefix]
            self.default = plain[0] if plain else None
        self._model_cache: dict[str, Upstream | None] = {}

    def split_path(self, path: str) -> tuple[Upstream | None, str] | None:
        """(upstream chosen by prefix or None, path after /v1) or None when not an API path."""
        if path.startswith("/v1/"):
            return None, path[3:]
        if self._by_prefix:
            head, sep, rest = path[1:].partition("/")
            up = self._by_prefix.get("/" + head)
            if up is not None and sep and rest.startswith("v1/"):
                return up, rest[2:]
        return None

    def by_model(self, model: str | None) -> Upstream | None:
        if model is None or not self._by_model:
            return self.default
        try:
            return self._model_cache[model]
        except KeyError:
            pass
        up = next((u for u in self._by_model if u.matches(model)), self.default)
        if len(self._model_cache) < 10_000:
            self._model_cache[model] = up
        return up

    async def open(self) -> None:
        for u in self.upstreams:
            await u.open()

    async def close(self) -> None:
        for u in self.upstreams:
            await u.close()
