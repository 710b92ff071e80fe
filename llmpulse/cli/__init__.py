"""`llmpulse` command line. Each module in this package adds its commands via `register()`."""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from collections.abc import Callable, Sequence
from typing import Any

from llmpulse.config import ConfigError, Settings, load_settings
from llmpulse.errors import LLMPulseError

Handler = Callable[[argparse.Namespace], int | None]


def settings_of(args: argparse.Namespace) -> Settings:
    """The validated settings for this invocation (cached on the namespace)."""
    cached = getattr(args, "_settings", None)
    if cached is None:
        overrides: dict[str, Any] = dict(getattr(args, "_overrides", {}) or {})
        cached = load_settings(args.config, overrides=overrides)
        args._settings = cached
        logging.getLogger().setLevel(cached.log_level)
    return cached  # type: ignore[no-any-return]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmpulse",
        description="Real-time monitoring of LLM API calls and GPUs.",
    )
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=None,
        help="config file (default: llmpulse.yaml if present, else built-in defaults; env LLMPULSE_CONFIG)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return int(handler(args) or 0)
    except ConfigError as exc:
        print(f"llmpulse: {exc}", file=sys.stderr)
        return 2
    except LLMPulseError as exc:
        print(f"llmpulse: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
