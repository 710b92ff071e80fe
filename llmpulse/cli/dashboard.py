"""`llmpulse dashboard`: the web dashboard, its JSON API, read-only /api/query and /metrics."""

from __future__ import annotations

import argparse
import asyncio
import signal

from llmpulse.cli import settings_of


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "dashboard",
        help="serve the web dashboard, its HTTP API and /metrics",
        description="Serve the dashboard at / (charts by model, app or user; GPUs; alerts; the call log), "
        "read-only SQL at /api/query and the pipeline's metrics at /metrics. Binds to loopback unless "
        "dashboard.host says otherwise; set LLMPULSE_SECRET_DASHBOARD_TOKEN to require a bearer token.",
    )
    p.add_argument("--host", default=None, help="address to listen on (default dashboard.host, 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default dashboard.port, 8080; 0 picks a free one)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from llmpulse.analysis.api import DashboardServer, token_from_env
    from llmpulse.embedded.runtime_file import update_runtime

    settings = settings_of(args)
    server = DashboardServer(settings, token_from_env(), host=args.host, port=args.port)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        url = await server.start()
        if settings.clickhouse.embedded:
            update_runtime(settings.data_dir, dashboard=url)
        print(f"llmpulse dashboard: {url}/ (API {url}/api/query, metrics {url}/metrics)"
              + ("; bearer token required" if server.app_token else ""), flush=True)  # fmt: skip
        try:
            await stop.wait()
        finally:
            await server.stop()
            if settings.clickhouse.embedded:
                update_runtime(settings.data_dir, dashboard=None)

    asyncio.run(main())
    return 0
