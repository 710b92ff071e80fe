"""`llmpulse gpu`: sample the GPUs through NVML (or a simulated device) and publish GpuSample events."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from llmpulse.cli import settings_of
from llmpulse.errors import LLMPulseError


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "gpu",
        help="sample GPUs through NVML and publish to the gpu topic",
        description="Every interval, read each GPU through NVML (utilisation, memory, temperature, "
        "power, processes) and publish one GpuSample per GPU to <prefix>gpu, keyed by host. "
        "Without an NVIDIA driver it says so and exits non-zero; --simulate reads a simulated device.",
    )
    p.add_argument("--simulate", action="store_true", help="read a simulated GPU instead of NVML")
    p.add_argument("--interval", type=float, default=None, metavar="S", help="seconds between readings (gpu.interval_s)")
    p.add_argument("--rounds", type=int, default=None, metavar="N", help="stop after N readings (default: run until stopped)")
    p.add_argument("--dry-run", action="store_true", help="print the samples as JSON lines instead of publishing")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from llmpulse.producers.gpu.nvml import NvmlUnavailable, load_nvml
    from llmpulse.producers.gpu.sampler import GpuSampler, simulated_from_settings
    from llmpulse.schemas import GpuSample, encode

    settings = settings_of(args)
    if args.interval is not None:
        if args.interval <= 0:
            raise LLMPulseError("--interval must be positive")
        settings = settings.model_copy(update={"gpu": settings.gpu.model_copy(update={"interval_s": args.interval})})
    if args.simulate or settings.gpu.simulate:
        nvml = simulated_from_settings(settings)
        nvml.nvmlInit()
    else:
        try:
            nvml = load_nvml()  # type: ignore[assignment]
        except NvmlUnavailable as exc:
            raise LLMPulseError(
                f"no NVIDIA driver on this machine ({exc}); nothing to sample (--simulate reads a simulated GPU)"
            ) from None

    if args.dry_run:
        def publish(_topic: str, sample: GpuSample, _key: str) -> None:
            print(encode(sample).decode(), flush=True)

        publisher = None
    else:
        from llmpulse.kafka.bootstrap import resolve_bootstrap
        from llmpulse.kafka.clients import producer_settings
        from llmpulse.kafka.topics import ensure_topics
        from llmpulse.producers.publisher import EventPublisher

        bootstrap = resolve_bootstrap(settings)
        ensure_topics(bootstrap, settings.kafka)
        publisher = EventPublisher(producer_settings(bootstrap, settings.kafka, **{"linger.ms": 50}))
        publish = publisher.publish  # type: ignore[assignment]

    sampler = GpuSampler.from_settings(settings, nvml, publish)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    count = nvml.nvmlDeviceGetCount()
    print(
        f"sampling {count} GPU(s) on {sampler.host} every {sampler.interval_s:g} s"
        + ("" if publisher is None else f" -> {sampler.topic}"),
        file=sys.stderr,
        flush=True,
    )
    try:
        sampler.run(stop, max_rounds=args.rounds)
    finally:
        if publisher is not None:
            left = publisher.flush(10)
            if left:
                print(f"{left} GPU samples not delivered", file=sys.stderr)
        nvml.nvmlShutdown()
    return 0
