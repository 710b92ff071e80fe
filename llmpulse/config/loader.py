"""Load llmpulse.yaml, apply LLMPULSE_* environment overrides, validate, explain errors.

Environment: ``LLMPULSE_SECTION__KEY=value`` sets ``section.key`` (``__`` nests);
values are read as YAML scalars, so ``3`` is a number and ``[10, 60]`` a list.
``LLMPULSE_KAFKA`` and ``LLMPULSE_CLICKHOUSE`` alone set the section's ``url``.
``LLMPULSE_CONFIG`` names the file. Unknown keys, in the file or the environment,
are errors.

Bounded: a file larger than `MAX_CONFIG_BYTES`, nested deeper than `MAX_CONFIG_DEPTH`,
or expanding (YAML anchors and aliases) to more than `MAX_CONFIG_VALUES` values stops
start-up with the file and the limit, never with a RecursionError or a hang.
"""

from __future__ import annotations

import os
import reprlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from llmpulse.config.model import Settings
from llmpulse.schemas.nesting import nesting_error

ENV_PREFIX = "LLMPULSE_"
DEFAULT_FILE = Path("llmpulse.yaml")
# LLMPULSE_<NAME> alone: the config key it sets.
ENV_ALIASES: dict[str, tuple[str, ...]] = {
    "KAFKA": ("kafka", "url"),
    "CLICKHOUSE": ("clickhouse", "url"),
    "DATA_DIR": ("data_dir",),
    "RULES_FILE": ("rules_file",),
    "LOG_LEVEL": ("log_level",),
    "APP": ("sdk", "app"),
    "TOPIC_PREFIX": ("kafka", "topic_prefix"),
}
# Read elsewhere (not config keys): the config path itself, secrets read by name, and the
# store's fault-injection gate (llmpulse/embedded/store.py, for the chaos bench).
ENV_NOT_CONFIG = {"CONFIG", "FAULT_STORE_DOWN_FILE"}
ENV_SECRET_PREFIXES = ("SECRET_",)
MAX_CONFIG_BYTES = 4 * 1024 * 1024
MAX_CONFIG_DEPTH = 32
MAX_CONFIG_VALUES = 1_000_000
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 2, 80, 80


class ConfigError(Exception):
    """A configuration that cannot start llmpulse; the message names file, key and expectation."""


def _expected(err: Mapping[str, Any]) -> str:
    msg = str(err["msg"])
    if err["type"] == "extra_forbidden":
        return "unknown key (not a setting of llmpulse)"
    if err["type"] == "missing":
        return "required key is missing"
    return msg


def _set_path(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value


def _env_overrides(environ: Mapping[str, str]) -> list[tuple[tuple[str, ...], Any, str]]:
    out: list[tuple[tuple[str, ...], Any, str]] = []
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX) :]
        if rest in ENV_NOT_CONFIG or rest.startswith(ENV_SECRET_PREFIXES):
            continue
        if rest in ENV_ALIASES:
            path = ENV_ALIASES[rest]
        else:
            path = tuple(p.lower() for p in rest.split("__"))
        try:
            value = bounded_yaml(raw, f"environment variable {name}") if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, (dict, list)) or value is None:
            pass
        elif not isinstance(value, (int, float, bool)):
            value = raw
        out.append((path, value, f"environment variable {name}"))
    return out


def bounded_yaml(text: str, where: str) -> Any:
    """yaml.safe_load within the depth and size limits, or ConfigError naming `where`."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where}: larger than {MAX_CONFIG_BYTES} bytes; a config is much smaller")
    try:
        value = yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(f"{where}: nested deeper than {MAX_CONFIG_DEPTH} levels") from None
    reason = nesting_error(value, MAX_CONFIG_DEPTH, MAX_CONFIG_VALUES)
    if reason is not None:
        raise ConfigError(f"{where}: {reason} (aliases counted as expanded); expected a plain settings file")
    return value


def _origin_of(loc: tuple[Any, ...], origins: dict[tuple[str, ...], str], default: str) -> str:
    for n in range(len(loc), 0, -1):
        key = tuple(str(p) for p in loc[:n])
        if key in origins:
            return origins[key]
    return default


def load_settings(
    path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """The validated settings: defaults, then the file, then the environment, then overrides."""
    env = os.environ if environ is None else environ
    explicit = path is not None or bool(env.get("LLMPULSE_CONFIG"))
    file_path = Path(path or env.get("LLMPULSE_CONFIG") or DEFAULT_FILE)
    tree: dict[str, Any] = {}
    source = f"{file_path}"
    if file_path.exists():
        try:
            if file_path.stat().st_size > MAX_CONFIG_BYTES:
                raise ConfigError(f"{file_path}: larger than {MAX_CONFIG_BYTES} bytes; a config is much smaller")
            loaded = bounded_yaml(file_path.read_text(encoding="utf-8"), str(file_path))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{file_path}: not valid YAML: {exc}") from exc
        except OSError as exc:
            raise ConfigError(f"{file_path}: cannot read: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{file_path}: expected a mapping of settings at the top level")
        tree = loaded
    elif explicit:
        raise ConfigError(f"{file_path}: config file not found")
    else:
        source = "built-in defaults"
    origins: dict[tuple[str, ...], str] = {}
    for env_path, value, origin in _env_overrides(env):
        _set_path(tree, env_path, value)
        origins[env_path] = origin
    for dotted, value in (overrides or {}).items():
        dotted_key = tuple(dotted.split("."))
        _set_path(tree, dotted_key, value)
        origins[dotted_key] = "command line"
    try:
        return Settings.model_validate(tree)
    except ValidationError as exc:
        lines = []
        for err in exc.errors(include_url=False):
            loc = tuple(err["loc"])
            where = _origin_of(loc, origins, source)
            key = ".".join(str(p) for p in loc)
            got = err.get("input")
            got_text = "" if err["type"] in ("missing", "extra_forbidden") or isinstance(got, (dict, BaseModel)) else f" (got {_REPR.repr(got)})"
            lines.append(f"{where}: key '{key}': {_expected(err)}{got_text}")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None
