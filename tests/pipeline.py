"""Run llmpulse components as real subprocesses against the test broker, as users run them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from llmpulse.analysis.client import query
from llmpulse.config import Settings, load_settings
from llmpulse.errors import LLMPulseError


def write_config(path: Path, settings: Settings, **extra: Any) -> Path:
    data = {
        "data_dir": str(settings.data_dir),
        "kafka": {"url": settings.kafka.url, "topic_prefix": settings.kafka.topic_prefix,
                  "partitions": settings.kafka.partitions},
        "worker": {"windows_s": [2, 10], "grace_s": 5.0, "idle_close_s": 2.0},
        "sink": {"batch_rows": 20_000, "batch_seconds": 0.5},
    }  # fmt: skip
    for dotted, value in extra.items():
        node = data
        parts = dotted.split("__")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    path.write_text(yaml.safe_dump(data))
    return path


class Component:
    def __init__(self, config: Path, *argv: str, log: Path) -> None:
        self.argv = [sys.executable, "-m", "llmpulse", "--config", str(config), *argv]
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Component:
        fh = open(self.log, "ab")  # noqa: SIM115
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLMPULSE_")}
        self.proc = subprocess.Popen(self.argv, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        fh.close()
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 60) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def settings_from(config: Path) -> Settings:
    return load_settings(config, environ={})


def wait_for(settings: Settings, sql: str, ok: Callable[[list[list[Any]]], bool], timeout: float = 120.0) -> list[list[Any]]:
    """Poll a query until `ok(rows)`; the last rows on timeout (the assertion shows them).

    A query that fails while the pipeline starts (store not yet owned, table not yet
    migrated) is polled again; but if it still fails at the deadline, that error is raised:
    returning [] there would let a check such as "no row holds the key" pass on a query that
    never ran.
    """
    deadline = time.monotonic() + timeout
    rows: list[list[Any]] = []
    while True:
        try:
            rows = query(settings, sql).rows
            if ok(rows):
                return rows
        except LLMPulseError:
            if time.monotonic() >= deadline:
                raise
        if time.monotonic() >= deadline:
            return rows
        time.sleep(0.5)
