"""`llmpulse sink`: Kafka -> ClickHouse, and (embedded) the query endpoint of the store."""

from __future__ import annotations

import argparse
import signal
import sys

from llmpulse.cli import settings_of


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "sink",
        help="write raw events, aggregates, alerts and dead letters to ClickHouse",
        description="Consume the llmpulse topics and write them to ClickHouse in batches, "
        "committing offsets only after each INSERT. Applies schema migrations at start. "
        "With the embedded store, this process owns it and answers `llmpulse query`.",
    )
    p.add_argument("--print-ddl", action="store_true", help="print the schema DDL (ON CLUSTER when clickhouse.cluster is set) and exit")
    p.add_argument("--migrate-only", action="store_true", help="apply migrations and exit")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from llmpulse.analysis.query_server import QueryServer
    from llmpulse.analysis.readonly import QueryLimits
    from llmpulse.embedded.runtime_file import update_runtime
    from llmpulse.kafka.bootstrap import resolve_bootstrap
    from llmpulse.kafka.topics import ensure_topics
    from llmpulse.sinks.clickhouse.migrate import emit_ddl, open_migrated_waiting
    from llmpulse.sinks.clickhouse.sink import ClickHouseSink

    settings = settings_of(args)
    ch = settings.clickhouse
    if args.print_ddl:
        sys.stdout.write(emit_ddl(ch))
        return 0
    sc = settings.sink
    store, _ = open_migrated_waiting(ch, settings.data_dir, {"role": "sink"}, 15.0, sc.retry_initial_s, sc.retry_max_s)
    try:
        if args.migrate_only:
            return 0
        bootstrap = resolve_bootstrap(settings)
        ensure_topics(bootstrap, settings.kafka)
        server = None
        if ch.embedded:
            server = QueryServer(
                store.client, ch.database, ch.query_max_rows, ch.query_max_seconds,
                settings.sink.query_host, settings.sink.query_port, QueryLimits.of(ch),
            ).start()  # fmt: skip
            if store.lock is not None:
                store.lock.write_info({"role": "sink", "query_url": server.url})
            update_runtime(settings.data_dir, query_url=server.url)
        if settings.sink.web_port:
            from llmpulse.web_metrics import serve_metrics

            serve_metrics(settings.sink.web_port, settings.sink.web_host)
        sink = ClickHouseSink(settings, bootstrap, store.client)
        signal.signal(signal.SIGTERM, lambda *_: sink.stop())
        signal.signal(signal.SIGINT, lambda *_: sink.stop())
        print(f"sink writing to ClickHouse ({'embedded ' + str(settings.data_dir) if ch.embedded else ch.url})", flush=True)
        sink.run()
        if server is not None:
            server.stop()
    finally:
        store.close()
    return 0
