"""Events/s through one worker process with all default rules on, end to end from the
topic to closed windows on the aggregates topic, for single-event messages and batches;
and the worker's peak memory.

    python bench/run.py worker [--events N] [--single-events N]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from common import broker, closers, events, make_config, messages, rss_mb, start, stop
from confluent_kafka import Consumer

from tests.kafkatools import produce


def run_once(n: int, batch: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with broker(work) as b:
            config, settings = make_config(work, b.bootstrap)
            worker = start(config, "worker", log=work / "worker.log")
            consumer = Consumer({
                "bootstrap.servers": b.bootstrap, "group.id": f"bench-{uuid.uuid4().hex}",
                "auto.offset.reset": "earliest", "enable.auto.commit": False, "log_level": 3,
            })  # fmt: skip
            consumer.subscribe([settings.kafka.topic("aggregates")])
            try:
                evs = events(n)
                data_end = max(e.ts for e in evs).timestamp()
                msgs = messages(evs, batch) + closers(evs)
                time.sleep(10)  # the worker joins its group (Tansu answers JoinGroup after ~3 s)
                t0 = time.monotonic()
                produce(b.bootstrap, settings.kafka.topic("calls"), msgs)
                seen: dict[str, int] = {}
                deadline = time.monotonic() + 1200
                while time.monotonic() < deadline:
                    for m in consumer.consume(10_000, 0.2):
                        if m.error() is not None:
                            continue
                        a = json.loads(m.value())
                        if a["kind"] == "calls" and a["window_s"] == 60 and a["dims_key"] == "*":
                            from datetime import datetime

                            if datetime.fromisoformat(a["window_start"]).timestamp() <= data_end:
                                seen[a["aggregate_id"]] = a["requests"]
                    if sum(seen.values()) >= n:
                        break
                elapsed = time.monotonic() - t0
                assert sum(seen.values()) == n, f"{sum(seen.values())} of {n} events in closed windows"
                peak = rss_mb(worker.pid)
            finally:
                consumer.close()
                stop(worker)
    return {"events_per_s": n / elapsed, "seconds": elapsed, "rss_mb": peak}


def main() -> dict[str, Any]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=1_000_000, help="events in batch envelopes")
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--single-events", type=int, default=50_000, help="events as one message each")
    args = ap.parse_args()
    batched = run_once(args.events, args.batch)
    single = run_once(args.single_events, 1)
    return {
        "events": args.events,
        "events_per_message": args.batch,
        "events_per_s": round(batched["events_per_s"]),
        "rss_mb": round(batched["rss_mb"], 1),
        "single_events": args.single_events,
        "single_event_messages_events_per_s": round(single["events_per_s"]),
        "single_rss_mb": round(single["rss_mb"], 1),
        "rules": "built-in defaults (all on)",
        "dimension_sets": "global, model, provider, app, user, api key; windows 10 s and 60 s",
    }
