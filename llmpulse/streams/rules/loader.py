"""Load a rules file with errors that name the file, the rule and the key; hot reload.

``load_rules(None)`` returns the built-in defaults (``llmpulse/defaults/rules.yaml``).
Every rule window must be one of the worker's windows (``worker.windows_s``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from llmpulse.config.loader import ConfigError, bounded_yaml
from llmpulse.errors import LLMPulseError
from llmpulse.streams.rules.model import RULE_MODELS, CompositeRule, Rule, RuleSet

log = logging.getLogger(__name__)

DEFAULT_WINDOWS_S: tuple[int, ...] = (10, 60)
DEFAULT_RULES_FILE = Path(__file__).resolve().parents[2] / "defaults" / "rules.yaml"
_TOP_KEYS = {"version", "rules"}


class RulesError(LLMPulseError):
    """A rules file that cannot be used; the message names file, rule and key."""


def default_rules_text() -> str:
    return DEFAULT_RULES_FILE.read_text(encoding="utf-8")


def _fmt_error(err: Mapping[str, Any]) -> tuple[str, str]:
    loc = ".".join(str(p) for p in err["loc"] if p not in ("function-after", "function-before"))
    if err["type"] == "extra_forbidden":
        return loc, "unknown key"
    if err["type"] == "missing":
        return loc, "required key is missing"
    msg = str(err["msg"]).removeprefix("Value error, ")
    got = err.get("input")
    if (
        err["loc"]
        and not isinstance(got, (dict, list))
        and err["type"] not in ("value_error", "assertion_error")
    ):
        msg += f" (got {got!r})"
    return loc, msg


def _parse_rule(source: str, index: int, raw: Any) -> Rule:
    where = f"{source}: rules[{index}]"
    if not isinstance(raw, dict):
        raise RulesError(
            f"{where}: expected a mapping with 'name' and 'type', got {type(raw).__name__}"
        )
    name = raw.get("name")
    if isinstance(name, str) and name:
        where = f"{source}: rule {name!r}"
    rtype = raw.get("type", "threshold")
    model = RULE_MODELS.get(rtype) if isinstance(rtype, str) else None
    if model is None:
        raise RulesError(
            f"{where}: key 'type': expected one of {', '.join(RULE_MODELS)} (got {rtype!r})"
        )
    try:
        rule = model.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors(include_url=False):
            key, msg = _fmt_error(err)
            lines.append(f"{where}: key '{key}': {msg}" if key else f"{where}: {msg}")
        raise RulesError("invalid rules:\n  " + "\n  ".join(lines)) from None
    assert isinstance(rule, (*RULE_MODELS.values(),))
    return rule  # type: ignore[return-value]


def parse_rules(
    text: str, source: str = "<rules>", windows_s: Iterable[int] | None = DEFAULT_WINDOWS_S
) -> RuleSet:
    """Validate rules YAML text. ``windows_s``: the worker's windows (None: do not check)."""
    try:
        # the config's bounds (size, depth, aliases expanded): a pathological rules file is a
        # RulesError naming it, never a RecursionError escaping the worker's reload
        tree = bounded_yaml(text, source)
    except ConfigError as exc:
        raise RulesError(str(exc)) from None
    except yaml.YAMLError as exc:
        raise RulesError(f"{source}: not valid YAML: {exc}") from None
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise RulesError(f"{source}: expected a mapping with a 'rules' list at the top level")
    for key in tree:
        if key not in _TOP_KEYS:
            raise RulesError(
                f"{source}: key {key!r}: unknown key (expected {', '.join(sorted(_TOP_KEYS))})"
            )
    if tree.get("version", 1) != 1:
        raise RulesError(
            f"{source}: key 'version': only version 1 is known (got {tree.get('version')!r})"
        )
    raw_rules = tree.get("rules") or []
    if not isinstance(raw_rules, list):
        raise RulesError(f"{source}: key 'rules': expected a list of rules")
    rules = [_parse_rule(source, i, raw) for i, raw in enumerate(raw_rules)]
    if windows_s is not None:
        allowed = sorted(set(windows_s))
        for r in rules:
            if not isinstance(r, CompositeRule) and r.window not in allowed:
                raise RulesError(
                    f"{source}: rule {r.name!r}: key 'window': {r.window} s is not a worker window "
                    f"(worker.windows_s: {allowed})"
                )
    try:
        return RuleSet(rules=tuple(rules), source=source)
    except ValidationError as exc:
        msgs = [str(e["msg"]).removeprefix("Value error, ") for e in exc.errors(include_url=False)]
        raise RulesError(f"{source}: " + "; ".join(msgs)) from None


def load_rules(
    path: str | Path | None, windows_s: Iterable[int] | None = DEFAULT_WINDOWS_S
) -> RuleSet:
    """The rules of a YAML file, or the built-in defaults when ``path`` is None."""
    if path is None:
        source = "built-in rules (llmpulse/defaults/rules.yaml)"
        builtin = parse_rules(default_rules_text(), source, None)
        return builtin if windows_s is None else _fit_windows(builtin, sorted(set(windows_s)))
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RulesError(f"{p}: rules file not found") from None
    except OSError as exc:
        raise RulesError(f"{p}: cannot read: {exc}") from None
    return parse_rules(text, str(p), windows_s)


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class RulesReloader:
    """Re-reads a rules file when it changes; keeps the last good rules when it turns invalid.

    ``poll()`` is cheap (one ``stat``): call it every few seconds. It returns the new
    RuleSet when the file changed and is valid, otherwise None. ``rules`` is always the
    last good set. ``last_error`` holds the error of the last bad version (None when good).
    """

    def __init__(
        self,
        path: str | Path | None,
        windows_s: Iterable[int] | None = DEFAULT_WINDOWS_S,
        logger: logging.Logger | None = None,
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.windows_s = None if windows_s is None else tuple(windows_s)
        self.log = logger or log
        self.last_error: str | None = None
        self._stamp = _stamp(self.path) if self.path is not None else None
        self.rules = load_rules(self.path, self.windows_s)  # the first load must succeed

    def poll(self) -> RuleSet | None:
        if self.path is None:
            return None
        stamp = _stamp(self.path)
        if stamp == self._stamp:
            return None
        self._stamp = stamp
        try:
            rules = load_rules(self.path, self.windows_s)
        except RulesError as exc:
            self.last_error = str(exc)
            self.log.error(
                "rules not reloaded, keeping the %d previous rules: %s", len(self.rules.rules), exc
            )
            return None
        self.last_error = None
        self.rules = rules
        self.log.info("rules reloaded from %s: %d rules", self.path, len(rules.rules))
        return rules


def _fit_windows(rules: RuleSet, allowed: list[int]) -> RuleSet:
    """The built-in rules judged on the configured windows: each rule takes the largest
    configured window not above its own (the smallest when all are above)."""
    fitted = []
    for r in rules.rules:
        if isinstance(r, CompositeRule) or r.window in allowed:
            fitted.append(r)
            continue
        below = [w for w in allowed if w <= r.window]
        window = below[-1] if below else allowed[0]
        log.warning("built-in rule %r judges %d s windows (its %d s window is not configured)", r.name, window, r.window)
        fitted.append(r.model_copy(update={"window": window}))
    return RuleSet(rules=tuple(fitted), source=rules.source)
