"""`llmpulse mock-upstream`: an OpenAI-compatible mock model server."""

from __future__ import annotations

import argparse

from llmpulse.producers.mock_upstream import MockOptions, MockUpstream, run_mock_upstream


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "mock-upstream",
        help="run an OpenAI-compatible mock model server (demo, tests, benchmark)",
        description="Serve /v1/chat/completions, /v1/completions, /v1/embeddings and /v1/responses "
        "(streamed or not) with made-up text and exact usage.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 = a free port")
    p.add_argument("--latency-ms", type=float, default=0.0, help="delay before the first byte")
    p.add_argument("--chunk-delay-ms", type=float, default=0.0, help="delay between stream chunks")
    p.add_argument("--error-rate", type=float, default=0.0, help="fraction of requests answered with an error")
    p.add_argument("--error-status", type=int, default=500)
    p.add_argument("--completion-tokens", type=int, default=16)
    p.add_argument("--embedding-dim", type=int, default=8)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.error_rate <= 1:
        from llmpulse.errors import LLMPulseError

        raise LLMPulseError("--error-rate must be between 0 and 1")
    options = MockOptions(
        latency_ms=args.latency_ms,
        chunk_delay_ms=args.chunk_delay_ms,
        error_rate=args.error_rate,
        error_status=args.error_status,
        completion_tokens=args.completion_tokens,
        embedding_dim=args.embedding_dim,
        seed=args.seed,
    )

    def ready(mock: MockUpstream) -> None:
        print(f"mock upstream on {mock.base_url} (Ctrl-C stops it)", flush=True)

    run_mock_upstream(args.host, args.port, options, ready)
    return 0
