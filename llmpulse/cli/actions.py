"""`llmpulse actions list|approve|reject|undo|run`: actions taken on alerts (issue 10)."""

from __future__ import annotations

import argparse
import getpass
from datetime import datetime

from llmpulse.cli import settings_of


def _user(by: str | None) -> str:
    if by:
        return by
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("actions", help="actions taken on alerts: list, approve, reject, undo; run the engine")
    asub = p.add_subparsers(dest="actions_command", metavar="COMMAND")
    asub.required = True

    ls = asub.add_parser("list", help="live actions (proposed, pending, approved, applied)")
    ls.add_argument("--all", action="store_true", help="include rejected, expired, undone and failed actions")
    ls.add_argument("--json", action="store_true", help="one JSON object (the latest step) per line")
    ls.set_defaults(handler=run_list)

    for name, helptext in (
        ("approve", "approve a pending action (it applies at once)"),
        ("reject", "reject a pending action (it never applies)"),
        ("undo", "undo an action now (lifts a limit, block, fallback or open circuit)"),
    ):
        c = asub.add_parser(name, help=helptext)
        c.add_argument("action_id", help="the action id (a unique prefix is enough)")
        c.add_argument("--by", default=None, help="who (default: the current user)")
        if name != "approve":
            c.add_argument("--reason", default="", help="why")
        c.add_argument("--json", action="store_true", help="print the new step as JSON")
        c.set_defaults(handler=run_change, change=name)

    run = asub.add_parser("run", help="run the action engine: alerts in, actions out (one per deployment)")
    run.set_defaults(handler=run_engine_cmd)


def _ts(t: datetime | None) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S") if t is not None else "-"


def run_list(args: argparse.Namespace) -> int:
    from llmpulse.actions.model import describe
    from llmpulse.actions.ops import list_actions

    actions = list_actions(settings_of(args), include_done=args.all)
    if args.json:
        for a in actions:
            print(a.model_dump_json())
        return 0
    if not actions:
        print("no actions" if args.all else "no live actions (see --all)")
        return 0
    print(f"{'ACTION':<20}  {'STATUS':<8}  {'RULE':<20}  {'SINCE (UTC)':<19}  {'UNTIL (UTC)':<19}  {'BY':<12}  WHAT")
    for a in actions:
        print(
            f"{a.action_id:<20}  {a.status:<8}  {a.rule[:20]:<20}  {_ts(a.ts):<19}  {_ts(a.expires_at):<19}  "
            f"{a.actor[:12]:<12}  {describe(a)}"
        )
    return 0


def run_change(args: argparse.Namespace) -> int:
    from llmpulse.actions.model import describe
    from llmpulse.actions.ops import approve_action, reject_action, undo_action

    settings = settings_of(args)
    actor = _user(args.by)
    if args.change == "approve":
        ev = approve_action(settings, args.action_id, actor=actor)
    elif args.change == "reject":
        ev = reject_action(settings, args.action_id, actor=actor, reason=args.reason)
    else:
        ev = undo_action(settings, args.action_id, actor=actor, reason=args.reason)
    if args.json:
        print(ev.model_dump_json())
    else:
        until = f" until {_ts(ev.expires_at)} UTC" if ev.status == "applied" and ev.expires_at else ""
        print(f"action {ev.action_id} {ev.status} by {ev.actor}: {describe(ev)}{until}")
    return 0


def run_engine_cmd(args: argparse.Namespace) -> int:
    from llmpulse.actions.engine import run_engine

    run_engine(settings_of(args))
    return 0
