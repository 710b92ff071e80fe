"""The ClickHouse sink's throughput: raw call rows per second into ClickHouse, one sink process.

N calls are produced to the calls topic first (batch envelopes, as producers at high
rates send them); then `llmpulse sink` starts and we time from its first rows in
llm_calls until all N are there (rows_per_s), so the broker's produce rate and the
consumer group join are not part of the figure. Also reported: the same from the
sink's start (rows_per_s_from_start), the rows per CPU second the sink used over the
same span (rows_per_sink_cpu_s: what one process achieves per core, whatever else runs),
the 1-minute load average at the end, and its peak memory.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from common import broker, events, make_config, messages, rss_mb, start, stop, wait_sink_ready

from llmpulse.analysis.client import query
from llmpulse.errors import LLMPulseError
from tests.kafkatools import produce


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> dict[str, Any]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=500, help="events per Kafka message (1 = single events)")
    ap.add_argument("--batch-rows", type=int, default=50_000, help="sink.batch_rows")
    args = ap.parse_args()
    n = args.events
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with broker(work) as b:
            config, settings = make_config(work, b.bootstrap, sink={"batch_rows": args.batch_rows, "batch_seconds": 1.0})
            produce(b.bootstrap, settings.kafka.topic("calls"), messages(events(n, span_s=3600), args.batch))
            t_start = time.monotonic()
            sink = start(config, "sink", log=work / "sink.log")
            try:
                wait_sink_ready(settings)
                t_first = None
                first_rows = 0
                while True:
                    try:
                        have = int(query(settings, "SELECT count() FROM llmpulse.llm_calls").rows[0][0])
                    except LLMPulseError:
                        have = 0
                    now = time.monotonic()
                    if have and t_first is None:
                        t_first, first_rows, cpu_first = now, have, cpu_s(sink.pid)
                    if have >= n:
                        t_end, cpu_end = now, cpu_s(sink.pid)
                        break
                    if now - t_start > 900:
                        raise TimeoutError(f"{have} of {n} rows after 900 s")
                    time.sleep(0.05)
                sink_rss = rss_mb(sink.pid)
            finally:
                stop(sink)
            log = (work / "sink.log").read_text(errors="replace")
    assert t_first is not None
    return {
        "events": n,
        "events_per_message": args.batch,
        "batch_rows": args.batch_rows,
        "rows_per_s": round((n - first_rows) / max(t_end - t_first, 1e-6)),
        "rows_per_s_from_start": round(n / (t_end - t_start)),
        "sink_cpu_s": round(cpu_end - cpu_first, 2),
        "rows_per_sink_cpu_s": round((n - first_rows) / max(cpu_end - cpu_first, 1e-6)),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "first_rows_after_start_s": round(t_first - t_start, 2),
        "sink_rss_mb": round(sink_rss, 1),
        "sink_tracebacks": log.count("Traceback"),
        "note": "one `llmpulse sink` process, embedded chDB with the 1m/1h roll-up views, Tansu broker on the same "
        "2-core machine; rows_per_s times from the first rows to the last; "
        "rows_per_sink_cpu_s: the same rows per CPU second the sink process used (all its threads), less "
        "sensitive to other load on the machine",
    }
