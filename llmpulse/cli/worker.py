"""`llmpulse worker`: the Faust stream worker (windows, aggregates, rules, alerts)."""

from __future__ import annotations

import argparse
import gc

from llmpulse.cli import settings_of

# The cyclic GC's thresholds (gc.set_threshold): young collections every 20,000 net allocations of
# tracked objects, gen-1 collections every 1,000 young ones (Python's default: 700, 10, 10). Why,
# as measured on bench cardinality (10,000 users x 1,000 keys: almost every event its own
# accumulator; gc.callbacks timing each collection):
# - nearly nothing the worker makes is cyclic garbage (a run collects ~2,000 objects in ~600 young
#   collections): the GC's cost is walking live objects, a stage-1 batch's events and per-event
#   lists and tuples (alive until the batch ends) and an accumulator per event (alive until its
#   window closes);
# - a young collection walks the young objects alive at that moment: about the same total at
#   20,000 or 100,000 (~1.5-2 s of a run), a batch's objects outliving either; 20,000 keeps each
#   pause short (~3 ms, at most ~50 ms);
# - a gen-1 collection walks what survived the young ones since the last. Every 20 young ones it
#   walked most open windows' accumulators once more: ~1.6 s of a ~29 CPU-s run (37 collections,
#   up to 130 ms each). Every 1,000, most are gone before it (their windows closed): none in a run.
# The worst-case pause is a full or gen-1 collection walking the whole live set (every open
# window's accumulator and key, stage 2's dimension sets retained for backfills): at cardinality
# 270,000-390,000 tracked objects, 0.3-0.5 s on the bench machine. A full collection has that cost
# under either setting (Faust runs one at each rebalance); a gen-1 one now nears it once every
# 1,000 young ones (at 2,000 calls/s about every 7 minutes; on a backlog, every minute) instead of
# up to 130 ms every 20. An alert waits for its window to close (its length plus the grace): half
# a second more, that rarely, for ~5% of the worker's CPU.
GC_THRESHOLDS = (20_000, 1_000, 100)


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
    # baselines): the start-up objects frozen out of the cyclic GC's scans, and collections
    # rarer than Python's default (700, 10, 10): see GC_THRESHOLDS
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    worker.execute_from_commandline()
    return 0
