"""Many dimension values through one worker (issue 15): 10,000 users, 1,000 API keys,
20 apps and 50 models at 2,000 calls a second of event time for 10 simulated minutes,
replayed as fast as the worker takes it.

    python bench/run.py cardinality [--users 10000] [--keys 1000] [--apps 20] [--models 50]
                                    [--rate 2000] [--minutes 10] [--batch-s 1.0] [--seed 1]
                                    [--profile DIR]

Each call draws its user, key and model uniformly (the worst case for the number of
dimension values a window holds); a key belongs to one app (key k to app k mod apps),
a model to one of 5 providers. The calls go in batch envelopes as producers publishing
at such rates send them: per model, the calls of each `--batch-s` seconds of event time
(about 40 a message at the defaults). The worker runs with the shipped rules and its
default windows and dimension sets; the run is bench/replay.py's (everything produced
first, the clock from the worker's first event to the last 60 s window of all traffic).

Keys: events_per_s, aggregates_per_s, rss_mb (peak), aggregates (10 s, 60 s), seconds,
the worker's and machine's CPU, calibration_ms and load_average_1m (bench/common.py).
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import msgspec
from common import calibration
from detection_workload import day_start
from replay import profile_summary, replay_through_worker

from llmpulse.config import Settings
from llmpulse.schemas.base import SCHEMA_VERSION

PROVIDERS = ("openai", "anthropic", "google", "mistral", "vllm")
_enc = msgspec.json.Encoder()


def messages(args: argparse.Namespace, settings: Settings) -> Iterator[tuple[str, bytes, bytes]]:
    """(topic, key, value): the calls in envelopes per model and `batch_s` of event time,
    then one closer per model far past the data."""
    rng = random.Random(f"cardinality/{args.seed}")
    topic = settings.kafka.topic("calls")
    t0 = day_start(1, 0.0)
    n = int(args.rate * args.minutes * 60)
    per_batch = max(1, int(args.rate * args.batch_s))
    models = [f"model-{m:02d}" for m in range(args.models)]
    for lo in range(0, n, per_batch):
        by_model: dict[str, list[dict[str, Any]]] = {}
        for i in range(lo, min(n, lo + per_batch)):
            m = rng.randrange(args.models)
            key = rng.randrange(args.keys)
            failed = rng.random() < 0.01
            e: dict[str, Any] = {
                "event_id": f"card{args.seed}-{i:09d}", "ts": t0 + timedelta(seconds=i / args.rate),
                "model": models[m], "provider": PROVIDERS[m % len(PROVIDERS)], "app": f"app-{key % args.apps:02d}",
                "user": f"user-{rng.randrange(args.users):05d}", "api_key_hash": f"key-{key:04d}",
                "status_code": 500 if failed else 200, "latency_ms": round(rng.lognormvariate(6.5, 0.5), 1),
                "prompt_tokens": rng.randrange(50, 2000), "completion_tokens": rng.randrange(10, 800),
                "cost_usd": 0.0002,
            }  # fmt: skip
            if failed:
                e["error_type"] = "server_error"
            by_model.setdefault(e["model"], []).append(e)
        for model, group in by_model.items():
            yield topic, model.encode(), _enc.encode({"schema_version": SCHEMA_VERSION, "events": group})
    after = t0 + timedelta(seconds=n / args.rate + 200)
    for model in models:
        closer = {"event_id": f"closer-{args.seed}-{model}", "ts": after, "model": model}
        yield topic, model.encode(), _enc.encode(closer)


def main() -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--users", type=int, default=10_000)
    ap.add_argument("--keys", type=int, default=1_000)
    ap.add_argument("--apps", type=int, default=20)
    ap.add_argument("--models", type=int, default=50)
    ap.add_argument("--rate", type=float, default=2000.0, help="calls a second of event time")
    ap.add_argument("--minutes", type=float, default=10.0, help="simulated minutes")
    ap.add_argument("--batch-s", type=float, default=1.0, help="event-time seconds per envelope (per model)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--profile", type=Path, default=None, help="cProfile the worker into this folder")
    ap.add_argument("--digest", action="store_true", help="add aggregates_digest: the same aggregates, the same digest")
    args = ap.parse_args()
    cal = calibration()
    calls = int(args.rate * args.minutes * 60)
    t0 = day_start(1, 0.0)
    data_end = (t0 + timedelta(seconds=calls / args.rate)).timestamp()
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    r = replay_through_worker(
        lambda settings: messages(args, settings),
        lambda: calls,
        data_end,
        profile=None if args.profile is None else args.profile / "worker.prof",
        digest=args.digest,
    )
    return {
        "users": args.users, "keys": args.keys, "apps": args.apps, "models": args.models,
        "rate_per_s": args.rate, "minutes": args.minutes, "events": calls,
        "events_per_s": round(calls / r["seconds"], 1),
        **r,
        **profile_summary(args.profile),
        **cal,
    }  # fmt: skip
