"""The first slice end to end: N synthetic calls -> worker (windows) -> sink -> ClickHouse.

Figures: events/s through the worker (first produce until every event is in a closed
60 s window in ClickHouse) and rows/s of raw calls into ClickHouse.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    broker,
    closers,
    events,
    make_config,
    messages,
    rss_mb,
    start,
    stop,
    wait_rows,
    wait_sink_ready,
)

from tests.kafkatools import produce


def main() -> dict[str, Any]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=500, help="events per Kafka message (1 = single events)")
    args = ap.parse_args()
    n = args.events
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with broker(work) as b:
            config, settings = make_config(work, b.bootstrap)
            sink = start(config, "sink", log=work / "sink.log")
            worker = start(config, "worker", log=work / "worker.log")
            try:
                wait_sink_ready(settings)
                time.sleep(8)  # let the worker join its group (Tansu answers JoinGroup after ~3 s)
                evs = events(n)
                msgs = messages(evs, args.batch) + closers(evs)
                t0 = time.monotonic()
                produce(b.bootstrap, settings.kafka.topic("calls"), msgs)
                t_prod = time.monotonic()
                t_raw = wait_rows(settings, "SELECT count() FROM llmpulse.llm_calls", lambda r: r[0][0] >= n + 1)
                t_win = wait_rows(
                    settings,
                    "SELECT sum(requests) FROM llmpulse.llm_aggregates FINAL WHERE kind='calls' AND window_s=60 AND dims_key='*'",
                    lambda r: r[0][0] is not None and r[0][0] >= n,
                )
                worker_rss = rss_mb(worker.pid)
                sink_rss = rss_mb(sink.pid)
            finally:
                stop(worker)
                stop(sink)
    return {
        "events": n,
        "events_per_message": args.batch,
        "produce_s": round(t_prod - t0, 2),
        "events_per_s": round(n / (t_win - t0)),
        "rows_per_s": round(n / (t_raw - t0)),
        "worker_rss_mb": round(worker_rss, 1),
        "sink_rss_mb": round(sink_rss, 1),
        "note": "end to end on this 2-core machine, broker, worker and sink sharing the cores: "
        "events_per_s = N / (first produce -> every event in a closed 60 s window in ClickHouse)",
    }
