"""The topics of the public contract, and their creation up front."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable

from llmpulse.config.kafka import KafkaConfig
from llmpulse.errors import BrokerError

log = logging.getLogger(__name__)

CALLS = "calls"
GPU = "gpu"
HOST = "host"  # HostSample: CPU, memory and load of the hosts beside their GPUs, keyed by host
FEEDBACK = "feedback"
AGGREGATES = "aggregates"
ALERTS = "alerts"
ACTIONS = "actions"
DEADLETTER = "deadletter"
# internal: per-partition window partials on their way to the finalizer, keyed by dimension set
PARTIALS = "partials"
# internal: the notifier's delivery log and silences (compacted)
NOTIFICATIONS = "notifications"
SILENCES = "silences"

PUBLIC_TOPICS = (CALLS, GPU, HOST, FEEDBACK, AGGREGATES, ALERTS, ACTIONS, DEADLETTER)
ALL_TOPICS = (*PUBLIC_TOPICS, PARTIALS, NOTIFICATIONS, SILENCES)
COMPACTED = {ACTIONS, NOTIFICATIONS, SILENCES}


def ensure_topics(
    bootstrap: str, cfg: KafkaConfig, timeout: float = 30.0, compacted: Iterable[str] = ()
) -> list[str]:
    """Create every missing topic with the configured partitions; returns the created names.

    Consumers that subscribe before their topic exists may get no assignment on
    some brokers (Tansu), so every component calls this before it subscribes.
    `compacted`: further topics by full name, created compacted (a component's changelog).
    """
    from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

    admin = AdminClient({"bootstrap.servers": bootstrap, **client_security(cfg)})
    wanted = {cfg.topic(name): name for name in ALL_TOPICS}
    extra = set(compacted)
    deadline = time.monotonic() + timeout
    while True:
        try:
            existing = set(admin.list_topics(timeout=5).topics)
            break
        except Exception as exc:
            if time.monotonic() > deadline:
                raise BrokerError(f"cannot reach Kafka at {bootstrap}: {exc}") from None
            time.sleep(0.5)
    missing = [t for t in [*wanted, *sorted(extra)] if t not in existing]
    if not missing:
        return []
    new = []
    for topic in missing:
        config = {"cleanup.policy": "compact"} if topic in extra or wanted[topic] in COMPACTED else {}
        new.append(NewTopic(topic, cfg.partitions, cfg.replication_factor, config=config))
    created = []
    for topic, fut in admin.create_topics(new, request_timeout=timeout).items():
        try:
            fut.result()
            created.append(topic)
        except Exception as exc:
            if "TOPIC_ALREADY_EXISTS" in str(exc) or "already exists" in str(exc):
                continue
            raise BrokerError(f"cannot create topic {topic}: {exc}") from None
    log.info("created topics %s", ", ".join(created))
    return created


SASL_PASSWORD_ENV = "LLMPULSE_SECRET_KAFKA_SASL_PASSWORD"


def client_security(cfg: KafkaConfig) -> dict[str, str | int | float | bool]:
    """The librdkafka settings passed through from `kafka.client` (SASL, SSL, ...).

    The SASL password is a secret: it comes from LLMPULSE_SECRET_KAFKA_SASL_PASSWORD (which
    wins over a `sasl.password` in the file, so the file need not hold it)."""
    settings = dict(cfg.client)
    password = os.environ.get(SASL_PASSWORD_ENV)
    if password:
        settings["sasl.password"] = password
    return settings
