"""Consumer lag of the pipeline's consumer groups, sampled by the dashboard process for /metrics.

Sets `llmpulse_consumer_lag_messages{component, topic, partition}`: the partition's high
watermark minus the group's committed offset (the low watermark when nothing is committed).
Groups: the sink (`<prefix>sink`, every table's topic) and the worker (`<prefix>worker`, its
source topics). Note: the embedded Tansu broker reports high watermarks wrong (the start of
the last batch + 1), so against it the figure undercounts; Apache Kafka reports it right.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from llmpulse.config import Settings
from llmpulse.metrics import CONSUMER_LAG

log = logging.getLogger(__name__)

SINK_TOPICS = ("calls", "aggregates", "gpu", "host", "feedback", "alerts", "deadletter")
WORKER_TOPICS = ("calls", "gpu", "host", "feedback")


def groups_of(settings: Settings) -> dict[str, tuple[str, tuple[str, ...]]]:
    prefix = settings.kafka.topic_prefix
    return {"sink": (f"{prefix}sink", SINK_TOPICS), "worker": (f"{prefix}worker", WORKER_TOPICS)}


def consumer_lag(bootstrap: str, settings: Settings, group: str, topics: tuple[str, ...], timeout: float = 5.0) -> dict[tuple[str, int], int]:
    """{(topic without prefix, partition): messages behind} for one group."""
    from confluent_kafka import Consumer, TopicPartition

    from llmpulse.kafka.clients import consumer_settings

    c = Consumer(consumer_settings(bootstrap, settings.kafka, group))
    try:
        md = c.list_topics(timeout=timeout)
        full = {settings.kafka.topic(t): t for t in topics}
        tps = [TopicPartition(name, p) for name in full if name in md.topics for p in md.topics[name].partitions]
        if not tps:
            return {}
        out: dict[tuple[str, int], int] = {}
        for tp in c.committed(tps, timeout=timeout):
            lo, hi = c.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=timeout, cached=False)
            done = tp.offset if tp.offset >= 0 else lo
            out[(full[tp.topic], tp.partition)] = max(0, hi - done)
        return out
    finally:
        c.close()


class LagSampler:
    """Samples at most every `min_interval_s`; a broker that is down leaves the last figures."""

    def __init__(self, settings: Settings, min_interval_s: float = 5.0) -> None:
        self.settings = settings
        self.min_interval_s = min_interval_s
        self._last = 0.0
        self._lock = threading.Lock()

    def sample(self) -> None:
        with self._lock:
            if time.monotonic() - self._last < self.min_interval_s:
                return
            self._last = time.monotonic()
            try:
                from llmpulse.kafka.bootstrap import resolve_bootstrap

                bootstrap = resolve_bootstrap(self.settings)
                for component, (group, topics) in groups_of(self.settings).items():
                    for (topic, partition), lag in consumer_lag(bootstrap, self.settings, group, topics).items():
                        CONSUMER_LAG.labels(component, topic, str(partition)).set(lag)
            except Exception as exc:  # the metrics page must answer without Kafka
                log.debug("consumer lag not sampled: %s", exc)

    def __call__(self) -> Any:
        self.sample()
