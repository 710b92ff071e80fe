"""The SDK's settings, from the environment alone (plus llmpulse.yaml if one is in the cwd).

``LLMPULSE_KAFKA`` may be ``kafka://host:port[,host:port]`` or plain ``host:port``;
``LLMPULSE_APP`` names the app and ``LLMPULSE_TOPIC_PREFIX`` the topic prefix. Every
other key is ``LLMPULSE_<SECTION>__<KEY>`` as for the rest of llmpulse (e.g.
``LLMPULSE_SDK__QUEUE_SIZE``, ``LLMPULSE_CAPTURE__ENABLED``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from llmpulse.config import Settings, load_settings

# Single-word names the SDK accepts, and the config key each one sets.
SDK_ALIASES = {
    "LLMPULSE_APP": "LLMPULSE_SDK__APP",
    "LLMPULSE_TOPIC_PREFIX": "LLMPULSE_KAFKA__TOPIC_PREFIX",
}


def sdk_environ(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment with the SDK's conveniences turned into plain config keys."""
    env = dict(os.environ if environ is None else environ)
    for alias, key in SDK_ALIASES.items():
        if alias in env:
            value = env.pop(alias)
            env.setdefault(key, value)
    kafka = env.get("LLMPULSE_KAFKA", "").strip()
    if kafka and kafka != "embedded" and "://" not in kafka:
        env["LLMPULSE_KAFKA"] = "kafka://" + kafka
    return env


def load_sdk_settings(
    environ: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None
) -> Settings:
    """Settings for the SDK; raises llmpulse.config.ConfigError when the environment is wrong."""
    return load_settings(None, environ=sdk_environ(environ), overrides=overrides)
