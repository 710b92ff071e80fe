"""Demo traffic: realistic synthetic LLM calls with a schedule of incidents to catch.

Traffic: several apps (each with its users, API keys and model mix), models from
several providers, chat / completion / embedding calls, streamed and not, at a rate
that follows a daily rhythm (quiet at night, busy in the afternoon). It goes either
straight to Kafka (batch envelopes on `<prefix>calls`, keyed by model) or as HTTP
requests to any OpenAI-compatible base URL, normally the proxy in front of the mock
upstream (Claude models through Anthropic's `/v1/messages`, the others through the
OpenAI APIs); then the incidents are asked of the mock with its `x-mock-*` headers.

The incident schedule (offsets from the start, repeated when `repeat` is set):

    error_burst    half the calls to `gpt-4o-mini` fail (500 / 429)
    latency_spike  `claude-3-5-sonnet` answers 8x slower
    token_spike    app `summarizer` uses ~12x the tokens
    hot_key        one API key of app `search` calls ~300 times a minute (others < 100)
    gpu_pinned     simulated GPU 0 held at 98% utilisation

`default_schedule(scale)` shortens every offset and duration by `scale` (a test uses
0.05: the whole schedule in 27 s). `realtime=False` generates the schedule's events
at once with synthetic timestamps (tests); `realtime=True` paces them on the clock.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from llmpulse.config import Settings
from llmpulse.producers.gpu.host import PsutilHost, read_host_sample
from llmpulse.producers.gpu.nvml import PinnedWindow, SimulatedNvml
from llmpulse.producers.gpu.sampler import GpuSampler, read_samples
from llmpulse.producers.keyhash import KeyHasher, load_secret
from llmpulse.producers.pricing import price_call
from llmpulse.schemas import CallEvent, GpuSample, HostSample

log = logging.getLogger(__name__)

IncidentKind = Literal["error_burst", "latency_spike", "token_spike", "hot_key", "gpu_pinned"]
Operation = Literal["chat", "completion", "embedding"]

HOT_KEY = "sk-demo-search-hot-7f3a9c21d4e8b6a0"
HOT_KEY_PER_MIN = 300.0
"""Three times the abuse line (100 a minute): at the test's shortened schedule (9 s) the key still
draws ~45 calls against a line of 15, never within reach of Poisson noise (at 180: 27, ~1 % of
runs below the line)."""


def weighted_choice(rng: random.Random, options: tuple[tuple[str, float], ...]) -> str:
    """One name of (name, weight) pairs, drawn in proportion to the weights with one
    `rng.random()` (so a seeded generator replays the same traffic)."""
    r = rng.random() * sum(w for _, w in options)
    for name, w in options:
        r -= w
        if r <= 0:
            return name
    return options[-1][0]


@dataclass(frozen=True, slots=True)
class Incident:
    kind: IncidentKind
    start_s: float
    duration_s: float
    target: str  # model, app, API key, or GPU index, depending on the kind
    factor: float = 1.0

    @property
    def end_s(self) -> float:
        return self.start_s + self.duration_s

    def active(self, t: float) -> bool:
        return self.start_s <= t < self.end_s


@dataclass(frozen=True, slots=True)
class Schedule:
    incidents: tuple[Incident, ...]
    total_s: float

    def scaled(self, factor: float) -> Schedule:
        return Schedule(
            tuple(replace(i, start_s=i.start_s * factor, duration_s=i.duration_s * factor) for i in self.incidents),
            self.total_s * factor,
        )

    def active(self, kind: IncidentKind, t: float) -> Incident | None:
        for inc in self.incidents:
            if inc.kind == kind and inc.active(t):
                return inc
        return None

    def first(self, kind: IncidentKind) -> Incident:
        return next(i for i in self.incidents if i.kind == kind)


def default_schedule(scale: float = 1.0) -> Schedule:
    """Nine minutes: a calm minute, then one incident a minute and a half apart (x `scale`)."""
    base = Schedule(
        (
            Incident("error_burst", 60, 60, "gpt-4o-mini", 0.5),
            Incident("latency_spike", 150, 60, "claude-3-5-sonnet", 8.0),
            Incident("token_spike", 240, 60, "summarizer", 12.0),
            Incident("hot_key", 330, 60, HOT_KEY, HOT_KEY_PER_MIN),
            Incident("gpu_pinned", 420, 60, "0", 98.0),
        ),
        540,
    )
    return base if scale == 1.0 else base.scaled(scale)


@dataclass(frozen=True, slots=True)
class ModelProfile:
    model: str
    provider: str
    latency_ms: float  # typical latency of a 200-token answer
    operation: Operation = "chat"


MODELS = {
    m.model: m
    for m in (
        ModelProfile("gpt-4o-mini", "openai", 600),
        ModelProfile("gpt-4o", "openai", 1100),
        ModelProfile("claude-3-5-sonnet", "anthropic", 1300),
        ModelProfile("claude-3-5-haiku", "anthropic", 700),
        ModelProfile("gemini-2.0-flash", "google", 450),
        ModelProfile("llama-3.1-8b-instruct", "self-hosted", 300),
        ModelProfile("gpt-3.5-turbo-instruct", "openai", 500, "completion"),
        ModelProfile("text-embedding-3-small", "openai", 80, "embedding"),
    )
}


@dataclass(frozen=True, slots=True)
class AppProfile:
    name: str
    weight: float
    models: tuple[tuple[str, float], ...]
    users: int
    keys: tuple[str, ...]
    prompt_tokens: int  # mean
    completion_tokens: int  # mean
    stream_share: float


APPS = (
    AppProfile("support-bot", 0.35, (("gpt-4o-mini", 0.6), ("claude-3-5-haiku", 0.3), ("gpt-4o", 0.1)),
               40, tuple(f"sk-demo-support-{i}a2b3c4d5e6f7a8b" for i in range(4)), 600, 180, 0.6),
    AppProfile("search", 0.25, (("text-embedding-3-small", 0.5), ("gemini-2.0-flash", 0.3), ("gpt-4o-mini", 0.2)),
               60, tuple(f"sk-demo-search-{i}f1e2d3c4b5a6978" for i in range(3)), 300, 60, 0.2),
    AppProfile("summarizer", 0.2, (("claude-3-5-sonnet", 0.6), ("gpt-4o", 0.4)),
               15, tuple(f"sk-demo-summarizer-{i}566778899aabb" for i in range(2)), 2500, 350, 0.3),
    AppProfile("code-assistant", 0.2, (("claude-3-5-sonnet", 0.4), ("llama-3.1-8b-instruct", 0.3),
                                       ("gpt-3.5-turbo-instruct", 0.3)),
               25, tuple(f"sk-demo-code-{i}1b2c3d4e5f60718" for i in range(3)), 1200, 250, 0.7),
)


def daily_rhythm(ts: datetime) -> float:
    """Traffic multiplier by hour of day (UTC): ~0.3 at night, 1.0 mid-afternoon."""
    hour = ts.hour + ts.minute / 60
    day = max(0.0, math.sin(math.pi * (hour - 6) / 16)) if 6 <= hour <= 22 else 0.0
    return 0.3 + 0.7 * day


@dataclass(slots=True)
class SyntheticCall:
    ts: datetime
    app: str
    user: str
    api_key: str
    model: str
    provider: str
    operation: Operation
    streamed: bool
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    ttft_ms: float | None
    status_code: int = 200
    error_type: str | None = None
    incident: str | None = None


@dataclass
class LoadStats:
    calls: int = 0
    errors: int = 0
    gpu_samples: int = 0
    by_incident: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    http_failures: int = 0


class TrafficModel:
    """Deterministic (seeded) synthetic calls for any stretch of the schedule."""

    def __init__(
        self,
        schedule: Schedule,
        rate_per_s: float = 4.0,
        seed: int = 1,
        rhythm: Callable[[datetime], float] | None = daily_rhythm,
        repeat: bool = False,
    ) -> None:
        self.schedule = schedule
        self.rate = rate_per_s
        self.rng = random.Random(seed)
        self.rhythm = rhythm
        self.repeat = repeat

    def _offset(self, t: float) -> float:
        return t % self.schedule.total_s if self.repeat and self.schedule.total_s > 0 else t

    def _poisson(self, lam: float) -> int:
        if lam <= 0:
            return 0
        if lam > 30:
            return max(0, round(self.rng.gauss(lam, math.sqrt(lam))))
        limit, k, p = math.exp(-lam), 0, 1.0
        while True:
            p *= self.rng.random()
            if p <= limit:
                return k
            k += 1

    def calls_between(self, start: datetime, t0: float, t1: float) -> list[SyntheticCall]:
        """Calls whose offsets from `start` fall in [t0, t1)."""
        out: list[SyntheticCall] = []
        mid = start + timedelta(seconds=(t0 + t1) / 2)
        factor = self.rhythm(mid) if self.rhythm is not None else 1.0
        for _ in range(self._poisson(self.rate * factor * (t1 - t0))):
            t = self.rng.uniform(t0, t1)
            out.append(self._call(start, t))
        hot = self.schedule.active("hot_key", self._offset((t0 + t1) / 2))
        if hot is not None:
            for _ in range(self._poisson(hot.factor / 60.0 * (t1 - t0))):
                t = self.rng.uniform(t0, t1)
                out.append(self._call(start, t, hot_key=hot))
        out.sort(key=lambda c: c.ts)
        return out

    def _pick(self, options: tuple[tuple[str, float], ...]) -> str:
        return weighted_choice(self.rng, options)

    def _call(self, start: datetime, t: float, hot_key: Incident | None = None) -> SyntheticCall:
        rng = self.rng
        off = self._offset(t)
        if hot_key is not None:
            app = next(a for a in APPS if a.name == "search")
            model = MODELS["gpt-4o-mini"]
            key = hot_key.target
            user = "scraper-bot"
        else:
            app = APPS[[a.name for a in APPS].index(self._pick(tuple((a.name, a.weight) for a in APPS)))]
            model = MODELS[self._pick(app.models)]
            key = rng.choice(app.keys)
            user = f"{app.name}-user-{int(rng.paretovariate(1.2)) % app.users:03d}"
        incident: str | None = None
        prompt = max(1, int(rng.lognormvariate(math.log(app.prompt_tokens), 0.5)))
        completion = max(1, int(rng.lognormvariate(math.log(app.completion_tokens), 0.5)))
        if model.operation == "embedding":
            completion = 0
        spike = self.schedule.active("token_spike", off)
        if spike is not None and app.name == spike.target:
            prompt = int(prompt * spike.factor / 3)
            completion = int(completion * spike.factor)
            incident = "token_spike"
        streamed = model.operation != "embedding" and rng.random() < app.stream_share
        latency = model.latency_ms * (0.5 + completion / 400) * rng.lognormvariate(0, 0.3)
        slow = self.schedule.active("latency_spike", off)
        if slow is not None and model.model == slow.target:
            latency *= slow.factor
            incident = "latency_spike"
        ttft = latency * rng.uniform(0.12, 0.3) if streamed else None
        status, error = 200, None
        burst = self.schedule.active("error_burst", off)
        if burst is not None and model.model == burst.target and rng.random() < burst.factor:
            status, error = (500, "server_error") if rng.random() < 0.7 else (429, "rate_limit_exceeded")
            incident = "error_burst"
        elif rng.random() < 0.004:
            status, error = (503, "overloaded") if rng.random() < 0.5 else (429, "rate_limit_exceeded")
        if error is not None:
            completion, ttft = 0, None
            latency = min(latency, rng.uniform(40, 400))
        if hot_key is not None:
            incident = "hot_key"
        return SyntheticCall(
            ts=start + timedelta(seconds=t), app=app.name, user=user, api_key=key, model=model.model,
            provider=model.provider, operation=model.operation, streamed=streamed, prompt_tokens=prompt,
            completion_tokens=completion, latency_ms=round(latency, 1),
            ttft_ms=None if ttft is None else round(ttft, 1), status_code=status, error_type=error,
            incident=incident,
        )


def to_event(call: SyntheticCall, hasher: KeyHasher) -> CallEvent:
    ok = call.error_type is None
    return CallEvent(
        ts=call.ts, source="sdk", provider=call.provider, model=call.model,
        response_model=call.model if ok else None, operation=call.operation, app=call.app, user=call.user,
        api_key_hash=hasher.hash(call.api_key), status_code=call.status_code, error_type=call.error_type,
        latency_ms=call.latency_ms, ttft_ms=call.ttft_ms, streamed=call.streamed,
        prompt_tokens=call.prompt_tokens, completion_tokens=call.completion_tokens,
        cost_usd=price_call(call.model, call.prompt_tokens, call.completion_tokens),
    )


def gpu_pins(schedule: Schedule, wall_start: float, repeat_until: float | None = None) -> list[PinnedWindow]:
    """The schedule's gpu_pinned incidents as wall-clock windows of the simulated GPU."""
    out = []
    cycles = 1 if repeat_until is None else max(1, math.ceil((repeat_until - wall_start) / schedule.total_s))
    for n in range(cycles):
        base = wall_start + n * schedule.total_s
        for inc in schedule.incidents:
            if inc.kind == "gpu_pinned":
                out.append(PinnedWindow(int(inc.target), base + inc.start_s, base + inc.end_s, inc.factor))
    return out


def _fixed_clock(value: float) -> Callable[[], float]:
    return lambda: value


class LoadGenerator:
    """Runs a TrafficModel into Kafka or over HTTP, plus the simulated GPU with its incidents."""

    def __init__(
        self,
        settings: Settings,
        schedule: Schedule | None = None,
        *,
        mode: Literal["kafka", "http"] = "kafka",
        base_url: str | None = None,
        rate_per_s: float = 4.0,
        seed: int = 1,
        realtime: bool = True,
        repeat: bool = False,
        gpu: bool = True,
        gpu_interval_s: float | None = None,
        bootstrap: str | None = None,
        rhythm: Callable[[datetime], float] | None = daily_rhythm,
        http_concurrency: int = 64,
    ) -> None:
        if mode == "http" and not base_url:
            raise ValueError("http mode needs base_url (the proxy's OpenAI-compatible /v1 URL)")
        if mode == "http" and not realtime:
            raise ValueError("http mode runs in real time only")
        self.settings = settings
        self.schedule = schedule or default_schedule()
        self.mode = mode
        self.base_url = (base_url or "").rstrip("/")
        self.realtime = realtime
        self.repeat = repeat
        self.gpu = gpu
        self.gpu_interval_s = gpu_interval_s or settings.gpu.interval_s
        self.traffic = TrafficModel(self.schedule, rate_per_s, seed, rhythm, repeat)
        self.stats = LoadStats()
        self.http_concurrency = http_concurrency
        self._bootstrap = bootstrap
        self._publisher: Any = None
        self._hasher: KeyHasher | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sampler: GpuSampler | None = None

    # -- plumbing -------------------------------------------------------------------------
    def _ensure_publisher(self) -> Any:
        if self._publisher is None:
            from llmpulse.kafka.bootstrap import resolve_bootstrap
            from llmpulse.kafka.clients import producer_settings
            from llmpulse.producers.publisher import EventPublisher

            bootstrap = self._bootstrap or resolve_bootstrap(self.settings)
            self._publisher = EventPublisher(producer_settings(bootstrap, self.settings.kafka))
        return self._publisher

    @property
    def hasher(self) -> KeyHasher:
        if self._hasher is None:
            self._hasher = KeyHasher(load_secret(self.settings.data_dir))
        return self._hasher

    def _publish_calls(self, calls: list[SyntheticCall]) -> None:
        pub = self._ensure_publisher()
        topic = self.settings.kafka.topic("calls")
        groups: dict[str, list[CallEvent]] = defaultdict(list)
        for c in calls:
            groups[c.model].append(to_event(c, self.hasher))
        for model, events in groups.items():
            for i in range(0, len(events), 1000):
                pub.publish_batch(topic, events[i : i + 1000], key=model)
        pub.poll(0)

    def _publish_gpu(self, topic: str, sample: GpuSample | HostSample, key: str) -> None:
        self._ensure_publisher().publish(topic, sample, key)
        if isinstance(sample, GpuSample):
            self.stats.gpu_samples += 1

    def _count(self, calls: list[SyntheticCall]) -> None:
        self.stats.calls += len(calls)
        for c in calls:
            if c.error_type is not None:
                self.stats.errors += 1
            if c.incident:
                self.stats.by_incident[c.incident] += 1

    # -- runs -----------------------------------------------------------------------------
    def run_fast(self, start: datetime | None = None, duration_s: float | None = None, tick_s: float = 1.0) -> LoadStats:
        """The whole schedule (or `duration_s`) at once, timestamps from `start` (default now)."""
        start = start or datetime.now(UTC)
        total = duration_s if duration_s is not None else self.schedule.total_s
        t = 0.0
        while t < total:
            calls = self.traffic.calls_between(start, t, min(total, t + tick_s))
            self._count(calls)
            if calls:
                self._publish_calls(calls)
            t += tick_s
        if self.gpu:
            nvml = SimulatedNvml(gpus=self.settings.gpu.simulate_gpus,
                                 base_util_pct=self.settings.gpu.simulate_base_util_pct,
                                 pinned=gpu_pins(self.schedule, start.timestamp()))
            nvml.nvmlInit()
            host = self.settings.gpu.host or "demo-gpu-host"
            topic = self.settings.kafka.topic("gpu")
            # beside the simulated GPUs, this machine's real CPU, memory and load, stamped on
            # the same event-time grid (as the realtime demo samples them on the wall clock)
            host_reader = PsutilHost() if self.settings.gpu.host_resources else None
            host_topic = self.settings.kafka.topic("host")
            g = 0.0
            while g < total:
                when = start + timedelta(seconds=g)
                nvml.clock = _fixed_clock(when.timestamp())
                for s in read_samples(nvml, host, ts=when):
                    self._publish_gpu(topic, s, host)
                if host_reader is not None:
                    self._publish_gpu(host_topic, read_host_sample(host_reader, host, ts=when), host)
                g += self.gpu_interval_s
        self.flush()
        return self.stats

    def run(self, duration_s: float | None = None) -> LoadStats:
        """Pace the traffic on the wall clock until stopped, `duration_s`, or the schedule's end."""
        if not self.realtime:
            return self.run_fast(duration_s=duration_s)
        wall_start = time.time()
        start = datetime.fromtimestamp(wall_start, UTC)
        end = None if self.repeat and duration_s is None else (duration_s or self.schedule.total_s)
        if self.gpu:
            self._start_gpu(wall_start, end)
        try:
            if self.mode == "http":
                asyncio.run(self._run_http(start, end))
            else:
                self._run_kafka(start, end)
        finally:
            if self._sampler is not None:
                self._sampler.stop()
            self.flush()
        return self.stats

    def _start_gpu(self, wall_start: float, end: float | None) -> None:
        horizon = wall_start + (end if end is not None else 7 * 86400)
        nvml = SimulatedNvml(gpus=self.settings.gpu.simulate_gpus,
                             base_util_pct=self.settings.gpu.simulate_base_util_pct,
                             pinned=gpu_pins(self.schedule, wall_start, horizon if self.repeat else None))
        # beside the simulated GPUs, this machine's real CPU, memory and load (gpu.host_resources)
        host_reader = PsutilHost() if self.settings.gpu.host_resources else None
        self._sampler = GpuSampler(nvml, self._publish_gpu, self.settings.kafka.topic("gpu"),
                                   host=self.settings.gpu.host or "demo-gpu-host",
                                   interval_s=self.gpu_interval_s, host_reader=host_reader,
                                   host_topic=self.settings.kafka.topic("host")).start()

    def _ticks(self, start: datetime, end: float | None, tick_s: float = 0.2) -> Any:
        t0 = time.monotonic()
        t = 0.0
        while not self._stop.is_set() and (end is None or t < end):
            nxt = t + tick_s if end is None else min(end, t + tick_s)
            delay = nxt - (time.monotonic() - t0)
            if delay > 0 and self._stop.wait(delay):
                return
            yield self.traffic.calls_between(start, t, nxt)
            t = nxt

    def _run_kafka(self, start: datetime, end: float | None) -> None:
        for calls in self._ticks(start, end):
            self._count(calls)
            if calls:
                self._publish_calls(calls)

    async def _run_http(self, start: datetime, end: float | None) -> None:
        import aiohttp

        sem = asyncio.Semaphore(self.http_concurrency)
        tasks: set[asyncio.Task[None]] = set()
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for calls in self._ticks_async(start, end):
                batch = await calls
                self._count(batch)
                for c in batch:
                    task = asyncio.create_task(self._send_http(session, sem, c))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.wait(tasks, timeout=30)

    def _ticks_async(self, start: datetime, end: float | None) -> Any:
        loop_start = time.monotonic()
        t = 0.0
        tick_s = 0.2
        while not self._stop.is_set() and (end is None or t < end):
            nxt = t + tick_s if end is None else min(end, t + tick_s)

            async def wait_and_make(a: float = t, b: float = nxt) -> list[SyntheticCall]:
                delay = b - (time.monotonic() - loop_start)
                if delay > 0:
                    await asyncio.sleep(delay)
                return self.traffic.calls_between(start, a, b)

            yield wait_and_make()
            t = nxt

    async def _send_http(self, session: Any, sem: asyncio.Semaphore, c: SyntheticCall) -> None:
        headers = {
            "Authorization": f"Bearer {c.api_key}",
            "Content-Type": "application/json",
            "X-LLMPulse-App": c.app,
            "X-LLMPulse-User": c.user,
            "x-mock-latency-ms": f"{(c.ttft_ms if c.streamed and c.ttft_ms else c.latency_ms):.0f}",
            "x-mock-tokens": str(max(1, c.completion_tokens)),
        }
        if c.status_code >= 400:
            headers["x-mock-status"] = str(c.status_code)
        if c.streamed and c.ttft_ms is not None and c.completion_tokens:
            per_chunk = max(0.0, (c.latency_ms - c.ttft_ms) / c.completion_tokens)
            headers["x-mock-chunk-delay-ms"] = f"{min(per_chunk, 200):.1f}"
        text = "lorem ipsum " * max(1, c.prompt_tokens // 3)
        body: dict[str, Any]
        if c.provider == "anthropic" and c.operation == "chat":
            # Claude calls as the anthropic client sends them: Messages API, key in x-api-key
            headers["x-api-key"] = headers.pop("Authorization").removeprefix("Bearer ")
            headers["anthropic-version"] = "2023-06-01"
            path, body = "/messages", {
                "model": c.model, "max_tokens": 4096, "stream": c.streamed,
                "system": f"You help users of {c.app}.", "messages": [{"role": "user", "content": text}],
            }
        elif c.operation == "embedding":
            path, body = "/embeddings", {"model": c.model, "input": text}
        elif c.operation == "completion":
            path, body = "/completions", {"model": c.model, "prompt": text, "stream": c.streamed}
        else:
            path, body = "/chat/completions", {
                "model": c.model, "stream": c.streamed,
                "messages": [{"role": "system", "content": f"You help users of {c.app}."},
                             {"role": "user", "content": text}],
            }
        if c.streamed and path != "/messages":
            body["stream_options"] = {"include_usage": True}
        async with sem:
            try:
                async with session.post(self.base_url + path, data=json.dumps(body), headers=headers) as resp:
                    await resp.read()
            except Exception as exc:
                self.stats.http_failures += 1
                log.debug("loadgen request failed: %s", exc)

    # -- control --------------------------------------------------------------------------
    def start(self, duration_s: float | None = None) -> LoadGenerator:
        """Run in a daemon thread (for `llmpulse up --demo`); `stop()` ends it."""
        self._thread = threading.Thread(target=self.run, args=(duration_s,), name="llmpulse-loadgen", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def flush(self, timeout: float = 30.0) -> int:
        return 0 if self._publisher is None else int(self._publisher.flush(timeout))
