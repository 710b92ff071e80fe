"""Capture redaction and API key hashing: no secret or personal data leaves the process."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from llmpulse.config import load_settings
from llmpulse.config.loader import ConfigError
from llmpulse.producers.keyhash import KeyHasher, api_key_from_headers, load_secret, secret_file
from llmpulse.producers.redaction import CARD, EMAIL, KEY, PHONE, Redactor, capture_text, redact


@pytest.mark.parametrize(
    ("text", "marker"),
    [
        ("write to jane.doe+tag@mail.example.com now", EMAIL),
        ("call +1 (415) 555-2671", PHONE),
        ("call 020 7946 0958", PHONE),
        ("call 415-555-2671", PHONE),
        ("key sk-proj-AbCdEf0123456789ghIJklMNop", KEY),
        ("key sk-ant-api03-abcdefghijklmnop1234", KEY),
        ("aws AKIAIOSFODNN7EXAMPLE", KEY),
        ("google AIzaSyA1234567890abcdefghijklmnopqrstuv", KEY),
        ("Authorization: Bearer abc.def-ghi_jkl", KEY),
        ("token 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", KEY),
        ("pay with 4111 1111 1111 1111 please", CARD),
        ("pay with 5500-0000-0000-0004", CARD),
        ("pay with 378282246310005", CARD),
    ],
)
def test_sensitive_values_are_replaced(text: str, marker: str) -> None:
    out = redact(text)
    assert marker in out
    secret = text.split(" ", 2)[-1]
    assert secret not in out


@pytest.mark.parametrize(
    "text",
    ["the year 2024 and 42 apples", "on 2024-01-15 at 10:30", "version 1.2.3", "host 192.168.1.10",
     "order 12345", "pi is 3.14159"],
)
def test_ordinary_text_is_kept(text: str) -> None:
    assert redact(text) == text


def test_capture_truncates_after_redacting() -> None:
    text = "contact a@b.io " + "word " * 1000
    out = capture_text(text, 100)
    assert out is not None and len(out) <= 100
    assert out.startswith("contact [REDACTED_EMAIL] word")
    assert capture_text(None, 10) is None
    assert capture_text("short", 100) == "short"
    # a secret at the pre-cut boundary of a huge input never leaks in part
    huge = "x " * 30_000 + "sk-abcdefghijklmnopqrstuvwxyz0123456789"
    assert "sk-abc" not in (capture_text(huge, 20_000) or "")


def test_extra_patterns_from_config() -> None:
    settings = load_settings(
        None, environ={}, overrides={"capture.enabled": True, "capture.extra_patterns": [r"ACME-\d+"]}
    )
    assert settings.capture.enabled and settings.capture.max_chars == 4096
    r = Redactor(settings.capture.extra_patterns)
    assert r.redact("ticket ACME-1234 for bob@x.org") == "ticket [REDACTED] for [REDACTED_EMAIL]"
    with pytest.raises(ConfigError, match="invalid regular expression"):
        load_settings(None, environ={}, overrides={"capture.extra_patterns": ["("]})
    assert load_settings(None, environ={}).capture.enabled is False


def test_key_hash_is_keyed_stable_and_never_the_key(tmp_path: Path) -> None:
    key = "sk-test-1234567890abcdef"
    a = KeyHasher(b"secret-a")
    assert a.hash(key) == a.hash(key) == KeyHasher(b"secret-a").hash(key)
    assert a.hash(key) != KeyHasher(b"secret-b").hash(key)
    assert a.hash(key).startswith("hk_") and key not in a.hash(key)
    assert "secret-a" not in repr(a)


def test_secret_from_env_else_a_private_file_in_the_data_dir(tmp_path: Path) -> None:
    assert load_secret(tmp_path, environ={"LLMPULSE_SECRET_KEY_HASH": "s3"}) == b"s3"
    first = load_secret(tmp_path, environ={})
    assert first == load_secret(tmp_path, environ={})
    path = secret_file(tmp_path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_secret(tmp_path / "other", environ={}) != first
    # the secret env variable is not a config key (no "unknown key" error)
    load_settings(None, environ={"LLMPULSE_SECRET_KEY_HASH": "x"})


def test_api_key_from_headers() -> None:
    assert api_key_from_headers({"Authorization": "Bearer sk-1"}) == "sk-1"
    assert api_key_from_headers({"api-key": "az-1"}) == "az-1"
    assert api_key_from_headers({"x-api-key": "ant-1"}) == "ant-1"
    assert api_key_from_headers({}) is None
