"""`llmpulse silence add|list|expire`: mute alerts by rule and dimensions until they expire."""

from __future__ import annotations

import argparse
import getpass
import json
import re
from datetime import timedelta

from llmpulse.cli import settings_of
from llmpulse.errors import LLMPulseError

_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw]?)")
_WHOLE = re.compile(r"^(?:\d+(?:\.\d+)?[smhdw]?)+$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> timedelta:
    """`90s`, `30m`, `2h`, `1d`, `1w`, `1h30m` (a bare number is seconds)."""
    compact = text.replace(" ", "")
    if not _WHOLE.match(compact):
        raise LLMPulseError(f"invalid duration {text!r}: expected e.g. 30m, 2h, 1d, 1h30m")
    return timedelta(seconds=sum(float(n) * _UNITS[u] for n, u in _PART.findall(compact)))


def _dimension(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (a shell-style pattern), got {text!r}")
    return key, value


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("silence", help="mute alerts by rule and dimensions until an expiry")
    ssub = p.add_subparsers(dest="silence_command", metavar="ACTION")
    ssub.required = True

    add = ssub.add_parser("add", help="add a silence; prints its id")
    add.add_argument("--rule", help="rule name (shell-style pattern: error_*)")
    add.add_argument(
        "--dim", "-d", action="append", type=_dimension, default=[], metavar="KEY=VALUE",
        help="dimension to match (repeatable; value is a shell-style pattern)",
    )
    add.add_argument("--duration", default="1h", help="how long: 30m, 2h, 1d (default 1h)")
    add.add_argument("--comment", default="", help="why")
    add.add_argument("--by", default=None, help="who (default: the current user)")
    add.add_argument("--json", action="store_true", help="print the silence as JSON")
    add.set_defaults(handler=run_add)

    ls = ssub.add_parser("list", help="list active silences")
    ls.add_argument("--all", action="store_true", help="include expired silences")
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    ls.set_defaults(handler=run_list)

    ex = ssub.add_parser("expire", help="end a silence now")
    ex.add_argument("silence_id")
    ex.set_defaults(handler=run_expire)


def run_add(args: argparse.Namespace) -> int:
    from llmpulse.sinks.notifier.silences import add_silence

    by = args.by
    if by is None:
        try:
            by = getpass.getuser()
        except Exception:
            by = ""
    silence = add_silence(
        settings_of(args),
        duration=parse_duration(args.duration),
        rule=args.rule,
        dimensions=dict(args.dim),
        comment=args.comment,
        created_by=by,
    )
    if args.json:
        print(silence.model_dump_json())
    else:
        print(silence.silence_id)
    return 0


def run_list(args: argparse.Namespace) -> int:
    from llmpulse.schemas.base import utc_now
    from llmpulse.sinks.notifier.silences import list_silences

    silences = list_silences(settings_of(args), include_expired=args.all)
    now = utc_now()
    for s in silences:
        if args.json:
            print(json.dumps(s.model_dump(mode="json")))
            continue
        dims = ",".join(f"{k}={v}" for k, v in sorted(s.dimensions.items())) or "-"
        state = "active" if s.active(now) else ("expired" if s.ends_at <= now else "pending")
        ends = s.ends_at.strftime("%Y-%m-%d %H:%M:%S UTC")
        print(f"{s.silence_id}  {state:7}  rule={s.rule or '*'}  dims={dims}  until {ends}  by={s.created_by or '-'}  {s.comment}")
    if not silences and not args.json:
        print("no silences" if args.all else "no active silences")
    return 0


def run_expire(args: argparse.Namespace) -> int:
    from llmpulse.sinks.notifier.silences import expire_silence

    s = expire_silence(settings_of(args), args.silence_id)
    print(f"expired {s.silence_id} at {s.ends_at.strftime('%Y-%m-%d %H:%M:%S UTC')}")
    return 0
