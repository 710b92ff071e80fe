"""`llmpulse gpu`: sample the GPUs through NVML (or a simulated device) and publish GpuSample events,
and the host's CPU, memory and load (psutil) as HostSample events."""

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
        "power, processes) and publish one GpuSample per GPU to <prefix>gpu, keyed by host; beside them "
        "one HostSample (CPU, memory, load) to <prefix>host (gpu.host_resources). "
        "Without an NVIDIA driver it says so and exits non-zero; --simulate reads a simulated device, "
        "--host-only samples the host without GPUs.",
    )
    p.add_argument("--simulate", action="store_true", help="read a simulated GPU instead of NVML")
    p.add_argument("--host-only", action="store_true", help="sample only the host's CPU, memory and load (no NVML)")
    p.add_argument("--no-host", action="store_true", help="sample only the GPUs, not the host's CPU, memory and load")
    p.add_argument("--interval", type=float, default=None, metavar="S", help="seconds between readings (gpu.interval_s)")
    p.add_argument("--rounds", type=int, default=None, metavar="N", help="stop after N readings (default: run until stopped)")
    p.add_argument("--dry-run", action="store_true", help="print the samples as JSON lines instead of publishing")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from llmpulse.producers.gpu.nvml import Nvml, NvmlUnavailable, load_nvml
    from llmpulse.producers.gpu.sampler import GpuSampler, simulated_from_settings
    from llmpulse.schemas import encode
    from llmpulse.schemas.base import WireModel

    settings = settings_of(args)
    if args.host_only and args.no_host:
        raise LLMPulseError("--host-only and --no-host exclude each other")
    if args.no_host or args.host_only:
        settings = settings.model_copy(
            update={"gpu": settings.gpu.model_copy(update={"host_resources": bool(args.host_only)})}
        )
    if args.interval is not None:
        if args.interval <= 0:
            raise LLMPulseError("--interval must be positive")
        settings = settings.model_copy(update={"gpu": settings.gpu.model_copy(update={"interval_s": args.interval})})
    nvml: Nvml | None
    if args.host_only:
        nvml = None
    elif args.simulate or settings.gpu.simulate:
        nvml = simulated_from_settings(settings)
        nvml.nvmlInit()
    else:
        try:
            nvml = load_nvml()
        except NvmlUnavailable as exc:
            raise LLMPulseError(
                f"no NVIDIA driver on this machine ({exc}); nothing to sample (--simulate reads a simulated GPU, "
                "--host-only samples the host alone)"
            ) from None

    if args.dry_run:
        def publish(_topic: str, sample: WireModel, _key: str) -> None:
            print(encode(sample).decode(), flush=True)

        publisher = None
    else:
        from llmpulse.kafka.bootstrap import resolve_bootstrap
        from llmpulse.kafka.clients import producer_settings
        from llmpulse.kafka.topics import ensure_topics
        from llmpulse.producers.publisher import EventPublisher

        bootstrap = resolve_bootstrap(settings)
        ensure_topics(bootstrap, settings.kafka)
        publisher = EventPublisher(producer_settings(bootstrap, settings.kafka, **{"linger.ms": 50}), component="gpu")
        publish = publisher.publish  # type: ignore[assignment]

    sampler = GpuSampler.from_settings(settings, nvml, publish)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    count = 0 if nvml is None else nvml.nvmlDeviceGetCount()
    what = f"{count} GPU(s)" + (" and the host's CPU, memory and load" if sampler.host_reader is not None else "")
    to = ", ".join(t for t, on in ((sampler.topic, nvml is not None), (sampler.host_topic, sampler.host_reader is not None)) if on)
    print(
        f"sampling {what} on {sampler.host} every {sampler.interval_s:g} s" + ("" if publisher is None else f" -> {to}"),
        file=sys.stderr,
        flush=True,
    )
    try:
        sampler.run(stop, max_rounds=args.rounds)
    finally:
        if publisher is not None:
            left = publisher.flush(10)
            if left:
                print(f"{left} samples not delivered", file=sys.stderr)
        if nvml is not None:
            nvml.nvmlShutdown()
    return 0
