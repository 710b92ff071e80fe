"""`llmpulse broker`: run the embedded Kafka broker alone (for components started by hand)."""

from __future__ import annotations

import argparse
import signal
import threading

from llmpulse.cli import settings_of
from llmpulse.embedded.broker import EmbeddedBroker
from llmpulse.embedded.runtime_file import update_runtime
from llmpulse.kafka.topics import ensure_topics


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "broker",
        help="run the embedded Kafka broker (Tansu, in memory) and create the topics",
        description="Run the embedded Kafka-compatible broker (Tansu, memory only) on loopback, "
        "create the llmpulse topics and record its address in the data directory.",
    )
    p.add_argument("--port", type=int, default=None, help="port (default: kafka.broker_port; 0 = free)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    port = settings.kafka.broker_port if args.port is None else args.port
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with EmbeddedBroker(port, log_dir=settings.data_dir / "logs") as broker:
        ensure_topics(broker.bootstrap, settings.kafka)
        update_runtime(settings.data_dir, kafka=broker.bootstrap)
        print(f"embedded Kafka broker on {broker.bootstrap} (Ctrl-C stops it)", flush=True)
        while not stop.wait(0.5):
            if not broker.alive():
                print("the embedded broker exited", flush=True)
                return 1
        update_runtime(settings.data_dir, kafka=None)
    return 0
