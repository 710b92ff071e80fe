"""`llmpulse loadgen`: demo traffic with a schedule of incidents, via the proxy or straight to Kafka."""

from __future__ import annotations

import argparse
import signal
import sys

from llmpulse.cli import settings_of
from llmpulse.errors import LLMPulseError


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "loadgen",
        help="demo traffic with injected incidents (via the proxy or straight to Kafka)",
        description="Synthetic LLM calls from several apps, users, keys, models and providers, with a daily "
        "rhythm, streamed and not, and a schedule of incidents: an error burst, a latency spike, a "
        "token-usage spike, one API key far above the others, and a simulated GPU pinned at high utilisation.",
    )
    p.add_argument("--proxy", metavar="BASE_URL", default=None,
                   help="send HTTP calls to this OpenAI-compatible base URL (e.g. http://127.0.0.1:8080/v1); "
                   "default: publish straight to Kafka")
    p.add_argument("--rate", type=float, default=4.0, help="calls per second at the daily peak (default 4)")
    p.add_argument("--scale", type=float, default=1.0, help="shorten the incident schedule by this factor (0.1 = 54 s)")
    p.add_argument("--duration", type=float, default=None, metavar="S", help="stop after S seconds")
    p.add_argument("--once", action="store_true", help="run the schedule once (default: repeat it)")
    p.add_argument("--fast", action="store_true", help="Kafka mode: publish the whole schedule at once, "
                   "with timestamps from now on")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--no-gpu", action="store_true", help="no simulated GPU samples")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from llmpulse.producers.loadgen import LoadGenerator, default_schedule

    settings = settings_of(args)
    if args.rate <= 0 or args.scale <= 0:
        raise LLMPulseError("--rate and --scale must be positive")
    if args.fast and args.proxy:
        raise LLMPulseError("--fast publishes to Kafka; it cannot be used with --proxy")
    bootstrap = None
    if not args.proxy or not args.no_gpu:
        from llmpulse.kafka.bootstrap import resolve_bootstrap
        from llmpulse.kafka.topics import ensure_topics

        bootstrap = resolve_bootstrap(settings)
        ensure_topics(bootstrap, settings.kafka)
    schedule = default_schedule(args.scale)
    gen = LoadGenerator(
        settings, schedule, mode="http" if args.proxy else "kafka", base_url=args.proxy,
        rate_per_s=args.rate, seed=args.seed, realtime=not args.fast, repeat=not args.once and not args.fast,
        gpu=not args.no_gpu, bootstrap=bootstrap,
    )
    signal.signal(signal.SIGTERM, lambda *_: gen._stop.set())
    signal.signal(signal.SIGINT, lambda *_: gen._stop.set())
    print("incident schedule (offsets from start):", file=sys.stderr)
    for inc in schedule.incidents:
        print(f"  {inc.start_s:7.1f}s - {inc.end_s:7.1f}s  {inc.kind:<14} {inc.target}", file=sys.stderr)
    stats = gen.run(args.duration)
    print(
        f"sent {stats.calls} calls ({stats.errors} errors), {stats.gpu_samples} GPU samples; "
        f"incident calls: {dict(stats.by_incident)}"
        + (f"; {stats.http_failures} HTTP failures" if stats.http_failures else ""),
        flush=True,
    )
    return 0
