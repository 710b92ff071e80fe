"""API keys as keyed hashes: HMAC-SHA256 with a secret, never the key itself.

The secret comes from, in order:

1. the environment variable ``LLMPULSE_SECRET_KEY_HASH`` (any string; set the same
   value on every proxy and SDK process so that one key hashes to one value
   everywhere: that is what per-key dashboards and alerts group by);
2. else the file ``<data_dir>/secrets/key_hash.secret``: 32 random bytes (hex),
   created on first use with mode 0600 and kept, so hashes stay stable across
   restarts of processes sharing that data directory.

A hash looks like ``hk_<32 hex chars>`` (128 bits of the HMAC): enough to tell keys
apart, useless to recover or brute-force a key without the secret.

Light module (stdlib only): the in-app SDK imports it.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

ENV_SECRET = "LLMPULSE_SECRET_KEY_HASH"
SECRET_FILE = Path("secrets") / "key_hash.secret"
HASH_PREFIX = "hk_"
_HEX_CHARS = 32


def secret_file(data_dir: Path) -> Path:
    return data_dir / SECRET_FILE


def load_secret(data_dir: Path | None = None, environ: Mapping[str, str] | None = None) -> bytes:
    """The HMAC secret: env LLMPULSE_SECRET_KEY_HASH, else the data directory's secret file.

    Without either (no env, no data_dir) a random per-process secret is used:
    hashes are then consistent within this process only.
    """
    env = os.environ if environ is None else environ
    value = env.get(ENV_SECRET, "")
    if value:
        return value.encode()
    if data_dir is None:
        return secrets.token_bytes(32)
    path = secret_file(data_dir)
    try:
        return _read(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        os.chmod(path.parent, 0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process created it first
        return _read(path)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return _read(path)


def _read(path: Path) -> bytes:
    text = path.read_text().strip()
    if not text:
        raise ValueError(f"{path}: empty key-hash secret; delete it to create a new one")
    return text.encode()


class KeyHasher:
    """hash(key) -> 'hk_<hex>'. Results are cached (a handful of keys hash millions of times)."""

    def __init__(self, secret: bytes, max_cache: int = 10_000) -> None:
        if not secret:
            raise ValueError("the key-hash secret must not be empty")
        self._secret = secret
        self._cache: dict[str, str] = {}
        self._max_cache = max_cache

    @classmethod
    def from_env(cls, data_dir: Path | None = None) -> KeyHasher:
        return cls(load_secret(data_dir))

    def hash(self, api_key: str) -> str:
        h = self._cache.get(api_key)
        if h is None:
            digest = hmac.new(self._secret, api_key.encode(), hashlib.sha256).hexdigest()
            h = HASH_PREFIX + digest[:_HEX_CHARS]
            if len(self._cache) >= self._max_cache:
                self._cache.clear()
            self._cache[api_key] = h
        return h

    def __repr__(self) -> str:  # never show the secret
        return "KeyHasher(<secret>)"


def api_key_from_headers(headers: Mapping[str, str]) -> str | None:
    """The API key a client sent: `Authorization: Bearer`, `api-key` (Azure),
    `x-api-key` (Anthropic) or `x-goog-api-key` (Google). Header names are
    case-insensitive when `headers` is (aiohttp's and httpx's are)."""
    auth = headers.get("Authorization") or headers.get("authorization")
    if auth:
        scheme, _, token = auth.partition(" ")
        token = token.strip() if scheme.lower() in ("bearer", "basic", "token") else auth.strip()
        return token or None
    for name in ("api-key", "x-api-key", "x-goog-api-key"):
        v = headers.get(name)
        if v:
            return v.strip() or None
    return None
