"""Loopback ports: pick a free one, or say clearly that one is taken."""

from __future__ import annotations

import socket

from llmpulse.errors import LLMPulseError


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def ensure_port_free(port: int, what: str, host: str = "127.0.0.1") -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not "in use"
        try:
            s.bind((host, port))
        except OSError as exc:
            raise LLMPulseError(
                f"{what}: port {port} on {host} is already in use ({exc.strerror}); "
                "stop what holds it or choose another port (0 picks a free one)"
            ) from None


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.2) -> bool:
    try:
        socket.create_connection((host, port), timeout).close()
        return True
    except OSError:
        return False
