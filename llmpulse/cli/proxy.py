"""`llmpulse proxy`: the OpenAI-compatible monitoring proxy."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import signal
import sys

from llmpulse.cli import settings_of


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "proxy",
        help="run the monitoring proxy (OpenAI-compatible APIs and Anthropic Messages)",
        description="Serve /v1/* (OpenAI-compatible and Anthropic's /v1/messages, streaming included), "
        "forward to the configured upstreams (proxy.upstreams) and publish one CallEvent per call to "
        "Kafka. Point an OpenAI client's base_url at http://HOST:PORT/v1, an Anthropic client's at "
        "http://HOST:PORT (docs/anthropic.md). Also serves /metrics and /healthz.",
    )
    p.add_argument("--host", default=None, help="listen address (default: proxy.host)")
    p.add_argument("--port", type=int, default=None, help="listen port (default: proxy.port; 0 = free)")
    p.add_argument(
        "--upstream",
        metavar="URL",
        default=None,
        help="one base URL ending in /v1 for every request (replaces proxy.upstreams)",
    )
    p.add_argument(
        "--loop",
        choices=("auto", "uvloop", "asyncio"),
        default="auto",
        help="event loop: uvloop when installed (auto, the default), or the stdlib asyncio loop",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.upstream:
        overrides = dict(getattr(args, "_overrides", {}) or {})
        overrides["proxy.upstreams"] = [{"name": "upstream", "base_url": args.upstream}]
        args._overrides = overrides
    settings = settings_of(args)

    async def main() -> None:
        from llmpulse.producers.proxy import start_proxy

        server = await start_proxy(settings, host=args.host, port=args.port)
        # a process of its own: keep the cyclic GC's full scans off the request path
        # (startup objects frozen out of it; young-generation collections rarer)
        gc.collect()
        gc.freeze()
        gc.set_threshold(20_000, 20, 1000)
        # the publisher's thread hands the GIL back to the event loop within 1 ms, not 5
        sys.setswitchinterval(0.001)
        print(f"llmpulse proxy on {server.base_url} (Ctrl-C stops it)", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await server.stop()

    from llmpulse.producers.proxy.loop import run as run_loop

    run_loop(main(), args.loop)
    return 0
