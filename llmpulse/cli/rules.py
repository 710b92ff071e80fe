"""`llmpulse rules backtest --rules FILE --since 7d`: what a rules file would have fired on stored windows."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from llmpulse.cli import settings_of

PAGE = 5000  # rows per query (below clickhouse.query_max_rows, which cuts larger results)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("rules", help="check a rules file, or backtest it on stored windows")
    rsub = p.add_subparsers(dest="rules_command", metavar="SUBCOMMAND")
    rsub.required = True
    b = rsub.add_parser(
        "backtest",
        help="replay stored windows (llm_aggregates) through a rules file: what would have fired, per rule and day",
        description="Replay the final windows stored in ClickHouse through a rules file with the worker's own "
        "engine and print the alerts it would have published, per rule and per day (UTC). Windows of the "
        "warm-up before the period build baselines and SLO windows and are not counted.",
    )
    b.add_argument("--rules", default=None, help="the rules file (default: the configured rules_file or the built-in rules)")
    b.add_argument("--since", default="7d", help="the period, ending now (or --until): 24h, 7d (default 7d)")
    b.add_argument("--until", default=None, help="end of the period: ISO 8601 or 'now' (default now)")
    b.add_argument("--warmup", default="1d", help="history judged before the period, not counted (default 1d)")
    b.add_argument("--format", choices=["table", "json"], default="table")
    b.set_defaults(handler=run_backtest)
    c = rsub.add_parser("check", help="validate a rules file against the configured worker windows")
    c.add_argument("file")
    c.set_defaults(handler=run_check)


def _page_rows(run: Callable[[str], Any], db: str, where: str, page: int) -> Iterator[dict[str, Any]]:
    """All rows of llm_aggregates FINAL matching ``where``, in (window_end, aggregate_id) order."""
    from llmpulse.sinks.clickhouse.rows import AGG_COLUMNS

    cols = [c for c in AGG_COLUMNS if c not in ("window_start", "window_end")]
    select = ", ".join([*cols, "toUnixTimestamp64Milli(window_start)", "toUnixTimestamp64Milli(window_end)"])
    after = ""
    while True:
        sql = (
            f"SELECT {select} FROM {db}.llm_aggregates FINAL WHERE {where}{after} "
            f"ORDER BY window_end, aggregate_id LIMIT {page}"
        )
        rows = run(sql).rows
        for r in rows:
            d = dict(zip(cols, r[:-2], strict=True))
            d["window_start"] = datetime.fromtimestamp(int(r[-2]) / 1000, tz=UTC)
            d["window_end"] = datetime.fromtimestamp(int(r[-1]) / 1000, tz=UTC)
            yield d
        if len(rows) < page:
            return
        last_end, last_id = int(rows[-1][-1]), str(rows[-1][0]).replace("\\", "\\\\").replace("'", "\\'")
        after = (
            f" AND (toUnixTimestamp64Milli(window_end), aggregate_id) > ({last_end}, '{last_id}')"
        )


def run_backtest(args: argparse.Namespace) -> int:
    from llmpulse.analysis.client import query
    from llmpulse.analysis.panels import parse_duration, parse_time, ts_lit
    from llmpulse.schemas import WindowAggregate
    from llmpulse.streams.rules import load_rules
    from llmpulse.streams.rules.backtest import backtest, format_backtest
    from llmpulse.streams.rules.model import CompositeRule

    settings = settings_of(args)
    rules = load_rules(args.rules or settings.rules_file, settings.worker.windows_s)
    end = parse_time(args.until) if args.until else datetime.now(UTC)
    start = end - parse_duration(args.since)
    first = start - (parse_duration(args.warmup) if args.warmup not in ("0", "0s") else timedelta(0))
    judged = {(r.kind, r.window) for r in rules.rules if not isinstance(r, CompositeRule)}
    if not judged:
        sys.stdout.write("the rules judge no windows\n")
        return 0
    kinds = " OR ".join(f"(kind = '{k}' AND window_s = {w})" for k, w in sorted(judged))
    where = f"window_start >= {ts_lit(first)} AND window_start < {ts_lit(end)} AND ({kinds})"
    db = settings.clickhouse.database

    page = min(PAGE, settings.clickhouse.query_max_rows)

    def run(sql: str) -> Any:
        return query(settings, sql, max_rows=page)

    aggs = (WindowAggregate.model_validate(d) for d in _page_rows(run, db, where, page))
    res = backtest(rules, aggs, start, end)
    if args.format == "json":
        sys.stdout.write(res.model_dump_json(indent=2) + "\n")
    else:
        sys.stdout.write(format_backtest(res) + "\n")
    return 0


def run_check(args: argparse.Namespace) -> int:
    from llmpulse.streams.rules import load_rules

    settings = settings_of(args)
    rules = load_rules(args.file, settings.worker.windows_s)
    sys.stdout.write(f"{args.file}: {len(rules.rules)} rules, valid\n")
    return 0
