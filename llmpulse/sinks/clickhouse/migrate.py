"""Apply the schema migrations in order, recording each in `schema_migrations`.

Every statement is idempotent (IF NOT EXISTS, MODIFY SETTING), so two processes
migrating at once, or a migration interrupted half-way, converge on one correct
schema; a statement that loses a race to create the same object ("already exists")
counts as done. `schema_migrations` is keyed by version (ReplacingMergeTree), so two
processes recording the same version leave one row after merges (read it with FINAL).
"""

from __future__ import annotations

import logging
from typing import Any

from llmpulse.config.clickhouse import ClickHouseConfig
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
