"""`llmpulse query "SQL"`: read-only SQL over the llmpulse tables."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from typing import Any

from llmpulse.cli import settings_of


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "query",
        help="run read-only SQL against the llmpulse tables",
        description="Run one read-only SELECT against database llmpulse. It may read llmpulse's "
        "tables and system.one, tables, columns and parts, and nothing else: no table functions "
        "(file, url, remote, s3 ...), no INTO OUTFILE, no SETTINGS; it runs with ClickHouse's "
        "readonly mode and the limits clickhouse.query_max_* (rows and bytes read, memory, time). "
        "A refusal exits 1 with the reason. With the embedded store it goes through the running "
        "sink when `up` runs, and opens the store directly otherwise.",
    )
    p.add_argument("sql", help='e.g. "SELECT model, count() FROM llmpulse.llm_calls FINAL GROUP BY model"')
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.add_argument("--max-rows", type=int, default=None, help="row limit (at most clickhouse.query_max_rows)")
    p.set_defaults(handler=run)


def _cell(v: Any) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, dict | list):
        return json.dumps(v)
    return str(v)


def format_table(columns: list[str], rows: list[list[Any]]) -> str:
    cells = [[_cell(v) for v in r] for r in rows]
    widths = [len(c) for c in columns]
    for r in cells:
        for i, v in enumerate(r):
            widths[i] = max(widths[i], len(v))
    numeric = [all(isinstance(r[i], int | float) and not isinstance(r[i], bool) for r in rows if r[i] is not None) for i in range(len(columns))]
    def line(vals: list[str]) -> str:
        return "  ".join(v.rjust(w) if numeric[i] else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths, strict=True))).rstrip()
    out = [line(columns), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    from llmpulse.analysis.client import query

    settings = settings_of(args)
    res = query(settings, args.sql, args.max_rows)
    if args.format == "json":
        for r in res.rows:
            sys.stdout.write(json.dumps(dict(zip(res.columns, r, strict=True))) + "\n")
    elif args.format == "csv":
        w = csv.writer(sys.stdout)
        w.writerow(res.columns)
        w.writerows(res.rows)
    else:
        sys.stdout.write(format_table(res.columns, res.rows) + "\n")
        sys.stdout.write(f"({len(res.rows)} row{'s' if len(res.rows) != 1 else ''}, {res.elapsed_ms:.0f} ms)\n")
    if res.truncated:
        print(f"llmpulse: result cut at {res.max_rows} rows (the row limit, clickhouse.query_max_rows / --max-rows)", file=sys.stderr)
    return 0
