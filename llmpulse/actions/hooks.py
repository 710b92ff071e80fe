"""Hook actions: POST the alert JSON to a URL, or run a command with it on stdin, with a timeout."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from llmpulse.config.actions import HookConfig

MAX_OUTPUT = 1000


@dataclass(frozen=True, slots=True)
class HookResult:
    ok: bool
    detail: dict[str, Any]


def _cut(data: bytes) -> str:
    return data[:MAX_OUTPUT].decode("utf-8", "replace")


def run_hook(hook: HookConfig, payload: dict[str, Any]) -> HookResult:
    """Run one hook; never raises. `detail` says what happened (status, exit code, output)."""
    body = json.dumps(payload, separators=(",", ":")).encode()
    if hook.url is not None:
        req = urllib.request.Request(
            hook.url,
            data=body,
            method="POST",
            headers={"Content-Type": "application/json", "User-Agent": "llmpulse-actions", **hook.headers},
        )
        try:
            with urllib.request.urlopen(req, timeout=hook.timeout) as resp:
                status = int(resp.status)
                text = _cut(resp.read(MAX_OUTPUT))
            return HookResult(200 <= status < 300, {"http_status": status, "output": text})
        except urllib.error.HTTPError as exc:
            return HookResult(False, {"http_status": exc.code, "error": f"HTTP {exc.code}"})
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            return HookResult(False, {"error": f"{type(exc).__name__}: {reason}"[:MAX_OUTPUT]})
    assert hook.command is not None
    try:
        proc = subprocess.run(
            hook.command, input=body, capture_output=True, timeout=hook.timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return HookResult(False, {"error": f"timed out after {hook.timeout:g}s"})
    except OSError as exc:
        return HookResult(False, {"error": f"cannot run {hook.command[0]!r}: {exc}"[:MAX_OUTPUT]})
    detail: dict[str, Any] = {"exit_code": proc.returncode, "output": _cut(proc.stdout)}
    if proc.returncode != 0:
        detail["stderr"] = _cut(proc.stderr)
    return HookResult(proc.returncode == 0, detail)
