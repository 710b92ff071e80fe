"""Serve `/metrics` from a component that has no web server of its own."""

from __future__ import annotations

from prometheus_client import start_http_server


def serve_metrics(port: int, host: str = "127.0.0.1") -> None:
    """Start prometheus-client's exporter thread on host:port (0 = do nothing)."""
    if port:
        start_http_server(port, addr=host)
