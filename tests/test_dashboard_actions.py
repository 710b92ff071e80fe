"""The dashboard shows, beside each alert, the actions taken on its incident at their latest stage."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from llmpulse.analysis import panels
from llmpulse.analysis.readonly import run_readonly
from llmpulse.config.clickhouse import ClickHouseConfig
from llmpulse.embedded.store import open_store
from llmpulse.schemas import ActionEvent, Alert, alert_fingerprint
from llmpulse.sinks.clickhouse.migrate import migrate
from llmpulse.sinks.clickhouse.rows import TABLES
from llmpulse.sinks.clickhouse.writer import BatchWriter


def test_alert_rows_carry_their_actions(tmp_path: Path) -> None:
    cfg = ClickHouseConfig()
    store = open_store(cfg, tmp_path)
    try:
        migrate(store.client, cfg)
        writer = BatchWriter(store.client, cfg.database)
        now = datetime.now(UTC).replace(microsecond=0)
        fp = alert_fingerprint("key_rate", {"api_key_hash": "hk_abc"})
        alert = Alert(fingerprint=fp, rule="key_rate", severity="warning", state="firing", metric="requests",
                      value=500, threshold=100, dimensions={"api_key_hash": "hk_abc"},
                      window_start=now - timedelta(minutes=1), window_end=now, started_at=now - timedelta(minutes=1), ts=now)  # fmt: skip
        writer.insert(TABLES["alerts"], [TABLES["alerts"].to_row(alert)], "a1")
        steps = [("proposed", 0, "llmpulse"), ("pending", 1, "llmpulse"), ("applied", 3, "llmpulse"), ("approved", 2, "alice")]
        events = [ActionEvent(event_id=f"act1:{s}", action_id="act1", status=s, kind="rate_limit", rule="throttle",  # type: ignore[arg-type]
                              alert_fingerprint=fp, target={"api_key_hash": "hk_abc"}, actor=who,
                              ts=now + timedelta(seconds=i)) for s, i, who in steps]  # fmt: skip
        events.append(ActionEvent(event_id="act2:pending", action_id="act2", status="pending", kind="block", rule="block",
                                  alert_fingerprint=fp, target={"api_key_hash": "hk_abc"}, ts=now))  # fmt: skip
        writer.insert(TABLES["actions"], [TABLES["actions"].to_row(e) for e in events], "x1")

        def run(sql: str) -> panels.QueryResult:  # type: ignore[name-defined]
            return run_readonly(store.client, sql, cfg.database, 10_000, 30)

        f = panels.Filters(start=now - timedelta(hours=1), end=now + timedelta(minutes=5))
        panel = panels.alerts(run, cfg.database, f)
        (row,) = [a for a in panel.active if a.fingerprint == fp]
        got = {a.action_id: (a.kind, a.status, a.actor) for a in row.actions}
        # the applied step wins over the approval that arrived later; act2 still waits for approval
        assert got == {"act1": ("rate_limit", "applied", "llmpulse"), "act2": ("block", "pending", "llmpulse")}
    finally:
        store.close()
