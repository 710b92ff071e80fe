"""`llmpulse worker`: the Faust stream worker (windows, aggregates, rules, alerts)."""

from __future__ import annotations

import argparse
import gc

from llmpulse.cli import settings_of

GC_YOUNG_THRESHOLD = 20_000


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "worker",
        help="run the stream worker: event-time windows, aggregates, rules and alerts",
        description="Consume calls, GPU samples and feedback; publish closed windows to the "
        "aggregates topic and rule verdicts to the alerts topic. Run several to scale out: "
        "they share the partitions through one consumer group.",
    )
    p.add_argument("--flush-on-exit", action="store_true", help="close and publish open windows on a clean stop")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import faust

    from llmpulse.kafka.bootstrap import resolve_bootstrap
    from llmpulse.kafka.topics import ensure_topics
    from llmpulse.streams.rules_hook import load_rules_hook
    from llmpulse.streams.worker_app import WorkerRuntime
    from llmpulse.web_metrics import serve_metrics

    settings = settings_of(args)
    if args.flush_on_exit:
        settings.worker.flush_open_windows_on_exit = True
    bootstrap = resolve_bootstrap(settings)
    runtime = WorkerRuntime(settings, bootstrap, rules=load_rules_hook(settings))
    # the stages' changelogs are not Faust tables': created here, before any client runs
    # (a topic created while the producer runs left its metadata request unanswered)
    ensure_topics(bootstrap, settings.kafka, compacted=runtime.changelogs)
    serve_metrics(settings.worker.web_port, settings.worker.web_host)
    worker = faust.Worker(runtime.app, loglevel=settings.log_level.lower(), quiet=True, redirect_stdouts=False)
    # a process of its own whose state is long-lived (open windows, retained windows, rule
    # baselines): the start-up objects frozen out of the cyclic GC's scans, and young
    # collections rarer (every 700 allocations by default; a window close allocates
    # thousands of short-lived dicts, each young collection also walking the survivors)
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 100)
    worker.execute_from_commandline()
    return 0
