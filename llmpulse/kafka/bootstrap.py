"""Where the Kafka brokers are: the configured cluster, or the running embedded broker."""

from __future__ import annotations

from llmpulse.config import Settings
from llmpulse.embedded.runtime_file import running_broker
from llmpulse.errors import BrokerError


def resolve_bootstrap(settings: Settings) -> str:
    if not settings.kafka.embedded:
        return settings.kafka.bootstrap_servers()
    addr = running_broker(settings.data_dir)
    if addr is None:
        raise BrokerError(
            f"kafka.url is 'embedded' but no embedded broker runs for data directory "
            f"{settings.data_dir}: start `llmpulse up` (or `llmpulse broker`), "
            "or set kafka.url / LLMPULSE_KAFKA to kafka://host:port"
        )
    return addr
