"""What an LLM call costs: a built-in price table, config overrides, one function.

Prices are USD per 1 million tokens: input, output, cached input (cache reads),
reasoning, and cache writes (Anthropic's prompt caching: a 5-minute and a 1-hour
rate). Token semantics follow OpenAI's usage object: `prompt_tokens` *includes*
`cached_tokens` and the cache-write tokens, and `completion_tokens` *includes*
`reasoning_tokens`. So::

    cost = (prompt - cached - written) * input + cached * cached_input
         + (written - written_1h) * cache_write + written_1h * cache_write_1h
         + (completion - reasoning) * output + reasoning * reasoning_price

(Anthropic reports `input_tokens` *without* the cache reads and writes; the proxy adds
them back into `prompt_tokens`, see `proxy/tokens.py`.) A rate left unset is the
input rate (cached, cache write), the cache-write rate (1-hour write), or the output
rate (reasoning): providers that charge no surcharge need no entry.

Lookup: the exact model name (case-insensitive), then the same with a provider
prefix like ``openai/`` removed, then glob patterns, the most specific first
(config entries before built-in ones of equal specificity). An unknown model
costs ``None`` (never a guess) and is counted in ``PriceTable.unknown``.

Light module (stdlib + the pydantic config model): the in-app SDK imports it.
"""

from __future__ import annotations

import fnmatch
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmpulse.config.pricing import PricingConfig


@dataclass(frozen=True, slots=True)
class Price:
    """USD per 1M tokens."""

    input: float
    output: float
    cached_input: float | None = None
    reasoning: float | None = None
    cache_write: float | None = None
    cache_write_1h: float | None = None

    def cost(
        self,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int = 0,
        reasoning_tokens: int = 0,
        cache_write_tokens: int = 0,
        cache_write_1h_tokens: int = 0,
    ) -> float:
        prompt = max(0, prompt_tokens)
        completion = max(0, completion_tokens)
        cached = min(max(0, cached_tokens), prompt)
        written = min(max(0, cache_write_tokens), prompt - cached)
        written_1h = min(max(0, cache_write_1h_tokens), written)
        reasoning = min(max(0, reasoning_tokens), completion)
        cached_price = self.input if self.cached_input is None else self.cached_input
        write_price = self.input if self.cache_write is None else self.cache_write
        write_1h_price = write_price if self.cache_write_1h is None else self.cache_write_1h
        reasoning_price = self.output if self.reasoning is None else self.reasoning
        usd = (
            (prompt - cached - written) * self.input
            + cached * cached_price
            + (written - written_1h) * write_price
            + written_1h * write_1h_price
            + (completion - reasoning) * self.output
            + reasoning * reasoning_price
        )
        return usd / 1_000_000


def _p(i: float, o: float, c: float | None = None, r: float | None = None) -> Price:
    return Price(i, o, c, r)


def _claude(i: float, o: float, read: float, write: float, write_1h: float) -> Price:
    """Anthropic: cache reads, 5-minute cache writes and 1-hour cache writes at their own rates."""
    return Price(i, o, cached_input=read, cache_write=write, cache_write_1h=write_1h)


# Public list prices (USD / 1M tokens) of common models. Dated snapshots match the
# `name-*` patterns below. Llama prices are typical hosted prices (they vary by host).
BUILTIN_PRICES: dict[str, Price] = {
    # OpenAI
    "gpt-5": _p(1.25, 10.0, 0.125),
    "gpt-5-mini": _p(0.25, 2.0, 0.025),
    "gpt-5-nano": _p(0.05, 0.40, 0.005),
    "gpt-4.1": _p(2.0, 8.0, 0.50),
    "gpt-4.1-mini": _p(0.40, 1.60, 0.10),
    "gpt-4.1-nano": _p(0.10, 0.40, 0.025),
    "gpt-4o": _p(2.50, 10.0, 1.25),
    "gpt-4o-mini": _p(0.15, 0.60, 0.075),
    "gpt-4-turbo": _p(10.0, 30.0),
    "gpt-4": _p(30.0, 60.0),
    "gpt-3.5-turbo": _p(0.50, 1.50),
    "gpt-3.5-turbo-instruct": _p(1.50, 2.0),
    "o1": _p(15.0, 60.0, 7.50),
    "o1-mini": _p(1.10, 4.40, 0.55),
    "o3": _p(2.0, 8.0, 0.50),
    "o3-mini": _p(1.10, 4.40, 0.55),
    "o4-mini": _p(1.10, 4.40, 0.275),
    "text-embedding-3-small": _p(0.02, 0.0),
    "text-embedding-3-large": _p(0.13, 0.0),
    "text-embedding-ada-002": _p(0.10, 0.0),
    # Anthropic: input, output, cache read, 5-minute cache write (1.25x input), 1-hour cache
    # write (2x input); base rates of prompts up to 200k tokens
    "claude-opus-4-6": _claude(5.0, 25.0, 0.50, 6.25, 10.0),
    "claude-sonnet-4-6": _claude(3.0, 15.0, 0.30, 3.75, 6.0),
    "claude-opus-4-5": _claude(5.0, 25.0, 0.50, 6.25, 10.0),
    "claude-opus-4-1": _claude(15.0, 75.0, 1.50, 18.75, 30.0),
    "claude-opus-4": _claude(15.0, 75.0, 1.50, 18.75, 30.0),
    "claude-sonnet-4-5": _claude(3.0, 15.0, 0.30, 3.75, 6.0),
    "claude-sonnet-4": _claude(3.0, 15.0, 0.30, 3.75, 6.0),
    "claude-haiku-4-5": _claude(1.0, 5.0, 0.10, 1.25, 2.0),
    "claude-3-7-sonnet": _claude(3.0, 15.0, 0.30, 3.75, 6.0),
    "claude-3-5-sonnet": _claude(3.0, 15.0, 0.30, 3.75, 6.0),
    "claude-3-5-haiku": _claude(0.80, 4.0, 0.08, 1.0, 1.6),
    "claude-3-opus": _claude(15.0, 75.0, 1.50, 18.75, 30.0),
    "claude-3-haiku": _claude(0.25, 1.25, 0.03, 0.30, 0.50),
    # Google
    "gemini-2.5-pro": _p(1.25, 10.0, 0.125),
    "gemini-2.5-flash": _p(0.30, 2.50, 0.075),
    "gemini-2.5-flash-lite": _p(0.10, 0.40, 0.025),
    "gemini-2.0-flash": _p(0.10, 0.40, 0.025),
    "gemini-2.0-flash-lite": _p(0.075, 0.30),
    "gemini-1.5-pro": _p(1.25, 5.0),
    "gemini-1.5-flash": _p(0.075, 0.30),
    # Mistral
    "mistral-large": _p(2.0, 6.0),
    "mistral-medium": _p(0.40, 2.0),
    "mistral-small": _p(0.10, 0.30),
    "codestral": _p(0.30, 0.90),
    "open-mistral-nemo": _p(0.15, 0.15),
    "mistral-embed": _p(0.10, 0.0),
    # Meta Llama (hosted)
    "llama-4-maverick": _p(0.27, 0.85),
    "llama-4-scout": _p(0.18, 0.59),
    "llama-3.3-70b": _p(0.88, 0.88),
    "llama-3.1-405b": _p(3.50, 3.50),
    "llama-3.1-70b": _p(0.88, 0.88),
    "llama-3.1-8b": _p(0.18, 0.18),
}
# Every built-in name also matches its dated / suffixed variants (gpt-4o-2024-08-06,
# claude-3-5-sonnet-20241022, mistral-large-latest, llama-3.1-8b-instruct, ...).
BUILTIN_PATTERNS: dict[str, Price] = {f"{name}-*": price for name, price in BUILTIN_PRICES.items()}
BUILTIN_PATTERNS.update(
    {
        "meta-llama-3.1-8b*": BUILTIN_PRICES["llama-3.1-8b"],
        "meta-llama-3.1-70b*": BUILTIN_PRICES["llama-3.1-70b"],
        "meta-llama-3.1-405b*": BUILTIN_PRICES["llama-3.1-405b"],
        "llama3.1:8b*": BUILTIN_PRICES["llama-3.1-8b"],
        "llama3.1:70b*": BUILTIN_PRICES["llama-3.1-70b"],
        "chatgpt-4o*": BUILTIN_PRICES["gpt-4o"],
    }
)

_GLOB_CHARS = re.compile(r"[*?\[]")


def _is_pattern(key: str) -> bool:
    return _GLOB_CHARS.search(key) is not None


def _specificity(pattern: str) -> int:
    return len(_GLOB_CHARS.sub("", pattern))


class PriceTable:
    """Exact names, then glob patterns; lookups are cached; unknown models are counted."""

    def __init__(
        self,
        prices: Mapping[str, Price] | None = None,
        *,
        builtin: bool = True,
        max_cache: int = 4096,
    ) -> None:
        exact: dict[str, Price] = {}
        patterns: list[tuple[int, int, str, re.Pattern[str], Price]] = []
        layers: list[tuple[int, Mapping[str, Price]]] = []
        if builtin:
            layers.append((0, {**BUILTIN_PRICES, **BUILTIN_PATTERNS}))
        layers.append((1, prices or {}))
        pat_index: dict[str, int] = {}
        for priority, layer in layers:
            for key, price in layer.items():
                k = key.lower()
                if _is_pattern(k):
                    entry = (_specificity(k), priority, k, re.compile(fnmatch.translate(k)), price)
                    if k in pat_index:
                        patterns[pat_index[k]] = entry
                    else:
                        pat_index[k] = len(patterns)
                        patterns.append(entry)
                else:
                    exact[k] = price
        patterns.sort(key=lambda e: (-e[0], -e[1]))
        self._exact = exact
        self._patterns = patterns
        self._cache: dict[str, Price | None] = {}
        self._max_cache = max_cache
        self._lock = threading.Lock()
        self.unknown: dict[str, int] = {}
        """Calls per model that had no price (bounded to `max_cache` names)."""
        self.unknown_calls = 0

    @classmethod
    def from_config(cls, cfg: PricingConfig) -> PriceTable:
        prices = {
            name: Price(p.input, p.output, p.cached_input, p.reasoning, p.cache_write, p.cache_write_1h)
            for name, p in cfg.models.items()
        }
        return cls(prices, builtin=cfg.builtin)

    def _find(self, name: str) -> Price | None:
        price = self._exact.get(name)
        if price is not None:
            return price
        if "/" in name:
            short = name.rsplit("/", 1)[1]
            price = self._exact.get(short)
            if price is not None:
                return price
        else:
            short = name
        for _, _, _, rx, p in self._patterns:
            if rx.match(name) or (short is not name and rx.match(short)):
                return p
        return None

    def lookup(self, model: str) -> Price | None:
        """The price of `model`, or None when neither a name nor a pattern matches."""
        try:
            return self._cache[model]
        except KeyError:
            pass
        price = self._find(model.strip().lower())
        if len(self._cache) < self._max_cache:
            self._cache[model] = price
        return price

    def cost(
        self,
        model: str,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int = 0,
        reasoning_tokens: int = 0,
        cache_write_tokens: int = 0,
        cache_write_1h_tokens: int = 0,
    ) -> float | None:
        price = self.lookup(model)
        if price is None:
            with self._lock:
                self.unknown_calls += 1
                if model in self.unknown or len(self.unknown) < self._max_cache:
                    self.unknown[model] = self.unknown.get(model, 0) + 1
            return None
        return price.cost(
            prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, cache_write_tokens, cache_write_1h_tokens
        )


_default_table: PriceTable | None = None


def default_table() -> PriceTable:
    """The built-in table (shared; its `unknown` counts are process-wide)."""
    global _default_table
    if _default_table is None:
        _default_table = PriceTable()
    return _default_table


def price_call(
    model: str,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int = 0,
    reasoning_tokens: int = 0,
    table: PriceTable | None = None,
    cache_write_tokens: int = 0,
    cache_write_1h_tokens: int = 0,
) -> float | None:
    """USD cost of one call, or None when the model has no price (counted in `table.unknown`)."""
    return (table or default_table()).cost(
        model, prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, cache_write_tokens, cache_write_1h_tokens
    )
