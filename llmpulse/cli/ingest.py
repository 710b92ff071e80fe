"""`llmpulse ingest`: serve POST /ingest/calls, /ingest/feedback and OTLP/HTTP /v1/traces."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

from llmpulse.cli import settings_of


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "ingest",
        help="HTTP endpoint for calls and feedback from any language, and OTLP/HTTP traces",
        description="Serve POST /ingest/calls (one CallEvent or a batch) and POST /ingest/feedback, "
        "validated with the schemas, and OTLP/HTTP POST /v1/traces (GenAI spans, protobuf or JSON; "
        "see docs/otlp.md); invalid items go to the dead-letter topic with the reason. "
        "Set LLMPULSE_SECRET_INGEST_TOKEN to require `Authorization: Bearer <token>`.",
    )
    p.add_argument("--host", default=None, help="address to listen on (ingest.host)")
    p.add_argument("--port", type=int, default=None, help="port (ingest.port; 0 = free)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from llmpulse.kafka.bootstrap import resolve_bootstrap
    from llmpulse.kafka.topics import ensure_topics
    from llmpulse.producers.ingest import IngestServer

    settings = settings_of(args)
    bootstrap = resolve_bootstrap(settings)
    ensure_topics(bootstrap, settings.kafka)

    async def main() -> None:
        server = IngestServer(settings, bootstrap=bootstrap, host=args.host, port=args.port)
        url = await server.start()
        print(
            f"ingest on {url}/ingest/calls, {url}/ingest/feedback and OTLP {url}/v1/traces (Ctrl-C stops it)",
            flush=True,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await server.stop()

    asyncio.run(main())
    return 0
