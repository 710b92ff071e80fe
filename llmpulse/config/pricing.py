"""Config section `pricing`: per-model prices that override or extend the built-in table.

Prices are USD per 1 million tokens. A key is either an exact model name or a glob
pattern (`*`, `?`, `[...]`); exact names are matched first, then patterns (the most
specific, i.e. the longest literal text, first). Example::

    pricing:
      models:
        my-finetune: {input: 3.0, output: 12.0}
        "llama-3.1-8b*": {input: 0.05, output: 0.08}
        my-claude-deployment: {input: 3.0, output: 15.0, cached_input: 0.3, cache_write: 3.75, cache_write_1h: 6.0}
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from llmpulse.config.base import Section

Price = Annotated[float, Field(ge=0, le=1_000_000, allow_inf_nan=False)]


class ModelPrice(Section):
    input: Price = Field(description="USD per 1M prompt (input) tokens")
    output: Price = Field(default=0.0, description="USD per 1M completion (output) tokens")
    cached_input: Price | None = Field(
        default=None, description="USD per 1M cached prompt tokens (default: the input price)"
    )
    reasoning: Price | None = Field(
        default=None, description="USD per 1M reasoning tokens (default: the output price)"
    )
    cache_write: Price | None = Field(
        default=None, description="USD per 1M prompt tokens written to the cache (default: the input price)"
    )
    cache_write_1h: Price | None = Field(
        default=None, description="USD per 1M prompt tokens written to the 1-hour cache (default: cache_write)"
    )


class PricingConfig(Section):
    builtin: bool = Field(default=True, description="start from the built-in price table")
    models: dict[Annotated[str, Field(min_length=1, max_length=256)], ModelPrice] = Field(
        default_factory=dict,
        description="model name or glob pattern -> price; overrides built-in entries",
    )
