"""Apply the schema migrations in order, recording each in `schema_migrations`.

Every statement is idempotent (IF NOT EXISTS, MODIFY SETTING), so two processes
migrating at once, or a migration interrupted half-way, converge on one correct
schema; a statement that loses a race to create the same object ("already exists")
counts as done. `schema_migrations` is keyed by version (ReplacingMergeTree), so two
processes recording the same version leave one row after merges (read it with FINAL).

`open_migrated` is how a writer opens the embedded store: migrated, then reopened when a
migration ran. ClickHouse names each materialized view inside the deduplication ids of
the blocks it writes (`insert_deduplication_token` + view + block number). A process that
created or altered a view names it differently from every process that loaded it from
disk afterwards (seen with chDB 4.4 / ClickHouse 26.9: raw table deduplicated, all four
roll-ups not). A batch written by the migrating sink and rebuilt by its successor after a
crash was therefore skipped by `llm_calls` and counted a second time in every roll-up
(issue 16: +1,000 requests in the first minute). After the reopen, the writer's views are
named as every later process names them, so a rebuilt batch is skipped everywhere.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmpulse.config.clickhouse import ClickHouseConfig
from llmpulse.embedded.store import Store, StoreUnreachable, open_store
from llmpulse.sinks.clickhouse.schema import migrations, migrations_table_ddl

log = logging.getLogger(__name__)


def applied_versions(client: Any, cfg: ClickHouseConfig) -> set[int]:
    rows = client.query(f"SELECT DISTINCT version FROM {cfg.database}.schema_migrations").result_rows
    return {int(r[0]) for r in rows}


def migrate(client: Any, cfg: ClickHouseConfig) -> list[int]:
    """Bring the schema up to date; returns the versions applied now."""
    client.command(f"CREATE DATABASE IF NOT EXISTS {cfg.database}" + (f" ON CLUSTER {cfg.cluster}" if cfg.cluster else ""))
    client.command(migrations_table_ddl(cfg))
    done = applied_versions(client, cfg)
    applied = []
    for m in migrations(cfg):
        if m.version in done:
            continue
        for stmt in m.statements:
            _run(client, stmt)
        client.insert(f"{cfg.database}.schema_migrations", [[m.version, m.name]], column_names=["version", "name"])
        log.info("applied migration %d: %s", m.version, m.name)
        applied.append(m.version)
    return applied


def open_migrated(
    cfg: ClickHouseConfig, data_dir: Path, owner_info: dict[str, Any] | None = None, wait_s: float = 0.0
) -> tuple[Store, list[int]]:
    """The store, its schema up to date, ready for deduplicated INSERTs; and the versions applied now.

    Embedded: reopened after applying a migration (see the module docstring), so nothing is
    ever inserted by a process whose views carry the ids of their creation. A ClickHouse
    server keeps the ids of its own CREATE until it restarts: see docs/clickhouse.md.
    """
    store = open_store(cfg, data_dir, owner_info, wait_s)
    try:
        applied = migrate(store.client, cfg)
    except BaseException:
        store.close()
        raise
    if applied and cfg.embedded:
        store.close()
        store = open_store(cfg, data_dir, owner_info, max(wait_s, 15.0))
    return store, applied


def open_migrated_waiting(
    cfg: ClickHouseConfig,
    data_dir: Path,
    owner_info: dict[str, Any] | None,
    wait_s: float,
    retry_initial_s: float,
    retry_max_s: float,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[Store, list[int]]:
    """`open_migrated`, waiting (with backoff) while ClickHouse is unreachable.

    A sink started while its store is down (a server restarting, a network cut; the chaos
    bench's store_down fault) used to exit with a traceback from its first migration
    statement, and stayed down until someone restarted it. Only unreachability is waited
    for: a store held by another owner, a bad schema or refused credentials still stop
    start-up at once with their error."""
    delay = retry_initial_s
    while True:
        try:
            return open_migrated(cfg, data_dir, owner_info, wait_s)
        except Exception as exc:
            if not _unreachable(exc):
                raise
            log.warning("ClickHouse is unreachable (%s); retrying in %.1f s", str(exc)[:300], delay)
        sleep(delay)
        delay = min(retry_max_s, delay * 2)


def _unreachable(exc: BaseException) -> bool:
    if isinstance(exc, StoreUnreachable):
        return True
    try:
        from clickhouse_connect.driver.exceptions import OperationalError
    except ImportError:  # pragma: no cover - clickhouse-connect is required to get here
        return False
    # the driver's OperationalError is its connection failure (refused, reset, timed out)
    return isinstance(exc, OperationalError)


_ALREADY_EXISTS = ("TABLE_ALREADY_EXISTS", "DATABASE_ALREADY_EXISTS", "already exists")


def _run(client: Any, stmt: str) -> None:
    try:
        client.command(stmt)
    except Exception as exc:
        if any(s in str(exc) for s in _ALREADY_EXISTS):
            log.info("already created by a concurrent migration: %s", stmt.split("(")[0].strip())
            return
        raise


def emit_ddl(cfg: ClickHouseConfig) -> str:
    """All DDL as one script (for review, or for a cluster with `clickhouse.cluster` set)."""
    out = [migrations_table_ddl(cfg) + ";"]
    for m in migrations(cfg):
        out.append(f"-- migration {m.version}: {m.name}")
        out.extend(s.strip() + ";" for s in m.statements)
    return "\n\n".join(out) + "\n"
