"""`llmpulse alerts tail`: print alerts as they arrive (a readable line each, or JSON lines)."""

from __future__ import annotations

import argparse
import signal
import sys
import time
import uuid
from types import FrameType

from llmpulse.cli import settings_of
from llmpulse.schemas.alert import Alert


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("alerts", help="watch the alerts topic")
    asub = p.add_subparsers(dest="alerts_command", metavar="ACTION")
    asub.required = True
    tail = asub.add_parser("tail", help="print alerts as they arrive")
    tail.add_argument("--json", action="store_true", help="one JSON object per line (the Alert model)")
    tail.add_argument("--from-beginning", action="store_true", help="start with the alerts already on the topic")
    tail.add_argument("--limit", "-n", type=int, default=0, help="exit after this many alerts")
    tail.add_argument("--timeout", type=float, default=0.0, help="exit after this many seconds")
    tail.set_defaults(handler=run_tail)


def format_alert(a: Alert) -> str:
    state = "RESOLVED" if a.state == "resolved" else a.severity.upper()
    dims = ",".join(f"{k}={v}" for k, v in sorted(a.dimensions.items())) or "all"
    what = f"{a.metric}={a.value:g}" if a.value is not None else a.metric
    if a.threshold is not None:
        what += f" threshold={a.threshold:g}"
    if a.baseline is not None:
        what += f" baseline={a.baseline:g}"
    window = f"{a.window_start.strftime('%H:%M:%S')}-{a.window_end.strftime('%H:%M:%S')}"
    line = f"{a.ts.strftime('%Y-%m-%d %H:%M:%S')} {state:8} {a.rule} [{dims}] {what} window {window}"
    line += f" since {a.started_at.strftime('%H:%M:%S')}"
    if a.summary:
        line += f" | {a.summary}"
    return line


def run_tail(args: argparse.Namespace) -> int:
    from confluent_kafka import Consumer

    from llmpulse.kafka.bootstrap import resolve_bootstrap
    from llmpulse.kafka.clients import consumer_settings
    from llmpulse.kafka.topics import ALERTS
    from llmpulse.schemas.codec import decode

    settings = settings_of(args)
    bootstrap = resolve_bootstrap(settings)
    topic = settings.kafka.topic(ALERTS)
    conf = consumer_settings(
        bootstrap,
        settings.kafka,
        f"llmpulse-tail-{uuid.uuid4().hex[:12]}",
        **{"auto.offset.reset": "earliest" if args.from_beginning else "latest"},
    )
    consumer = Consumer(conf)
    consumer.subscribe([topic])
    stop = False

    def on_signal(_sig: int, _frame: FrameType | None) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    deadline = time.monotonic() + args.timeout if args.timeout > 0 else None
    shown = 0
    try:
        while not stop and (deadline is None or time.monotonic() < deadline):
            for m in consumer.consume(500, 0.5):
                if m.error() is not None:
                    continue
                decoded = decode(m.value(), Alert)
                for bad in decoded.rejected:
                    print(f"(invalid alert at offset {m.offset()}: {bad.reason})", file=sys.stderr)
                for a in decoded.valid:
                    print(a.model_dump_json(exclude_none=True) if args.json else format_alert(a), flush=True)
                    shown += 1
                    if args.limit and shown >= args.limit:
                        return 0
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
    return 0
