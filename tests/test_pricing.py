"""Price table: exact names, patterns, config overrides, unknown models, token semantics."""

from __future__ import annotations

import pytest

from llmpulse.config import load_settings
from llmpulse.config.loader import ConfigError
from llmpulse.producers.pricing import BUILTIN_PRICES, Price, PriceTable, price_call


def test_exact_and_dated_names_share_a_price() -> None:
    assert price_call("gpt-4o-mini", 1_000_000, 1_000_000) == pytest.approx(0.15 + 0.60)
    assert price_call("gpt-4o-mini-2024-07-18", 1_000_000, 1_000_000) == pytest.approx(0.75)
    # the longer, more specific pattern wins: gpt-4o-mini-* before gpt-4o-*
    assert price_call("gpt-4o-2024-08-06", 1_000_000, 0) == pytest.approx(2.50)
    assert price_call("openai/gpt-4o", 1_000_000, 0) == pytest.approx(2.50)
    assert price_call("GPT-4O", 1_000_000, 0) == pytest.approx(2.50)
    assert price_call("claude-3-5-sonnet-20241022", 1_000_000, 1_000_000) == pytest.approx(18.0)
    assert price_call("mistral-large-latest", 1_000_000, 0) == pytest.approx(2.0)


def test_every_provider_family_is_in_the_table() -> None:
    for prefix in ("gpt-", "claude-", "gemini-", "mistral-", "llama-"):
        assert any(name.startswith(prefix) for name in BUILTIN_PRICES), prefix


def test_cached_and_reasoning_tokens_are_subsets_priced_at_their_rate() -> None:
    table = PriceTable({"m": Price(input=10, output=20, cached_input=1, reasoning=40)}, builtin=False)
    # 1M prompt of which 400k cached; 1M completion of which 250k reasoning
    cost = table.cost("m", 1_000_000, 1_000_000, cached_tokens=400_000, reasoning_tokens=250_000)
    assert cost == pytest.approx(0.6 * 10 + 0.4 * 1 + 0.75 * 20 + 0.25 * 40)
    # defaults: cached at the input price, reasoning at the output price; clamped to totals
    plain = PriceTable({"m": Price(input=10, output=20)}, builtin=False)
    assert plain.cost("m", 100, 100, cached_tokens=500, reasoning_tokens=500) == pytest.approx(
        (100 * 10 + 100 * 20) / 1e6
    )


def test_unknown_model_costs_none_and_is_counted() -> None:
    table = PriceTable()
    assert table.cost("my-private-model", 10, 10) is None
    assert table.cost("my-private-model", 10, 10) is None
    assert table.unknown == {"my-private-model": 2}
    assert table.unknown_calls == 2


def test_config_overrides_and_extends_the_builtin_table() -> None:
    settings = load_settings(
        None,
        environ={},
        overrides={
            "pricing.models": {
                "gpt-4o": {"input": 1.0, "output": 2.0},
                "acme-*": {"input": 3.0, "output": 4.0, "cached_input": 0.5},
            }
        },
    )
    table = PriceTable.from_config(settings.pricing)
    assert table.cost("gpt-4o", 1_000_000, 1_000_000) == pytest.approx(3.0)
    assert table.cost("acme-7b-chat", 1_000_000, 1_000_000, cached_tokens=1_000_000) == pytest.approx(4.5)
    assert table.cost("gpt-4o-mini", 1_000_000, 0) == pytest.approx(0.15)
    no_builtin = load_settings(None, environ={}, overrides={"pricing.builtin": False})
    assert PriceTable.from_config(no_builtin.pricing).cost("gpt-4o", 1, 1) is None


def test_invalid_price_config_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"pricing\.models\.x\.input"):
        load_settings(None, environ={}, overrides={"pricing.models": {"x": {"input": -1}}})
    with pytest.raises(ConfigError, match="unknown key"):
        load_settings(None, environ={}, overrides={"pricing.models": {"x": {"input": 1, "outptu": 2}}})


def test_cache_writes_are_part_of_the_prompt_priced_at_their_own_rates() -> None:
    table = PriceTable(
        {"m": Price(input=10, output=20, cached_input=1, cache_write=12.5, cache_write_1h=20)}, builtin=False
    )
    # 1M prompt: 300k cache reads, 200k cache writes of which 50k to the 1-hour cache, 500k plain
    cost = table.cost("m", 1_000_000, 0, cached_tokens=300_000, cache_write_tokens=200_000, cache_write_1h_tokens=50_000)
    assert cost == pytest.approx(0.5 * 10 + 0.3 * 1 + 0.15 * 12.5 + 0.05 * 20)
    # unset rates: writes at the input price, 1-hour writes at the write price; clamped to the prompt
    plain = PriceTable({"m": Price(input=10, output=20, cache_write=12.5)}, builtin=False)
    assert plain.cost("m", 100, 0, cache_write_tokens=100, cache_write_1h_tokens=40) == pytest.approx(100 * 12.5 / 1e6)
    assert plain.cost("m", 100, 0, cached_tokens=80, cache_write_tokens=500) == pytest.approx((80 * 10 + 20 * 12.5) / 1e6)
    # Claude models carry Anthropic's rates: reads 0.1x, 5-minute writes 1.25x, 1-hour writes 2x input
    assert price_call("claude-sonnet-4-6", 1_000_000, 0, cache_write_tokens=1_000_000) == pytest.approx(3.75)
    assert price_call("claude-haiku-4-5-20251001", 1_000_000, 0, cached_tokens=1_000_000) == pytest.approx(0.10)
    assert price_call(
        "claude-opus-4-6", 1_000_000, 0, cache_write_tokens=1_000_000, cache_write_1h_tokens=1_000_000
    ) == pytest.approx(10.0)
    settings = load_settings(None, environ={}, overrides={"pricing.models": {
        "my-claude": {"input": 3.0, "output": 15.0, "cached_input": 0.3, "cache_write": 3.75, "cache_write_1h": 6.0}
    }})
    mine = PriceTable.from_config(settings.pricing)
    assert mine.cost("my-claude", 2_000_000, 0, 0, 0, 1_000_000, 1_000_000) == pytest.approx(3.0 + 6.0)
