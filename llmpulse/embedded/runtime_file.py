"""`<data_dir>/runtime.json`: where the embedded services of a running `up` can be reached."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from llmpulse.embedded.ports import port_open


def runtime_path(data_dir: Path) -> Path:
    return data_dir / "runtime.json"


def read_runtime(data_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads(runtime_path(data_dir).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def update_runtime(data_dir: Path, **entries: Any) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    data = read_runtime(data_dir)
    data.update({k: v for k, v in entries.items() if v is not None})
    for k, v in entries.items():
        if v is None:
            data.pop(k, None)
    tmp = runtime_path(data_dir).with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, runtime_path(data_dir))


def running_broker(data_dir: Path) -> str | None:
    """host:port of the embedded broker recorded in the data directory, if it answers."""
    addr = read_runtime(data_dir).get("kafka")
    if isinstance(addr, str) and ":" in addr:
        host, _, port = addr.rpartition(":")
        if port.isdigit() and port_open(int(port), host):
            return addr
    return None
