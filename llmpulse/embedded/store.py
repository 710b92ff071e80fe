"""Open ClickHouse: embedded chDB in the data directory (one owning process), or a server."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

from llmpulse.config.clickhouse import ClickHouseConfig
from llmpulse.errors import StoreError


class StoreUnreachable(StoreError):
    """The ClickHouse server did not answer (refused, reset, timed out): worth waiting for."""


class StoreLock:
    """An exclusive lock on the chDB directory, held for the owner's lifetime."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "llmpulse.lock"
        self._fh: IO[str] | None = None

    def acquire(self, info: dict[str, Any] | None = None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip()
            fh.close()
            raise StoreError(
                f"the ClickHouse data directory {self.path.parent} is in use by another process"
                + (f" ({holder})" if holder else "")
                + "; only one process may hold an embedded store: query it through that process"
                " (llmpulse query does so while `llmpulse up` runs) or stop it first"
            ) from None
        self._fh = fh
        self.write_info(info or {})

    def write_info(self, info: dict[str, Any]) -> None:
        if self._fh is None:
            return
        self._fh.seek(0)
        self._fh.truncate()
        self._fh.write(json.dumps({"pid": os.getpid(), **info}))
        self._fh.flush()

    def release(self) -> None:
        if self._fh is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


def store_dir(data_dir: Path) -> Path:
    return (data_dir / "clickhouse").resolve()


def store_owner(data_dir: Path) -> dict[str, Any] | None:
    """What the process holding the embedded store wrote about itself, or None if nobody holds it."""
    path = store_dir(data_dir) / "llmpulse.lock"
    if not path.exists():
        return None
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            try:
                info = json.loads(fh.read() or "{}")
            except ValueError:
                info = {}
            return info if isinstance(info, dict) else {}
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        return None


class Store:
    """A clickhouse-connect client plus, in embedded mode, the lock that makes it ours."""

    def __init__(self, client: Any, lock: StoreLock | None, cfg: ClickHouseConfig) -> None:
        self.client = client
        self.lock = lock
        self.cfg = cfg

    @property
    def database(self) -> str:
        return self.cfg.database

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()
        if self.lock is not None:
            self.lock.release()


FAULT_STORE_DOWN_ENV = "LLMPULSE_FAULT_STORE_DOWN_FILE"
"""Fault injection, off unless set: names a file; while it exists, the store is unreachable."""


class StoreDownFault:
    """The store unreachable on demand, for fault injection (the chaos bench's "ClickHouse
    unreachable for the sink", bench/chaos.py).

    The embedded store lives inside the sink's process: there is no connection to cut, and
    a file mode does not stop root from writing. So, only when `LLMPULSE_FAULT_STORE_DOWN_FILE`
    names a path when the store is opened, every call of the client (insert, raw_insert,
    query, command) raises the driver's `OperationalError`, as a dropped connection does,
    while that file exists, and goes through unchanged otherwise. The code under test (the
    sink's retries, backoff and backpressure) runs as it does against a server that went
    away. One `stat` per call; without the variable the client is not wrapped at all.
    """

    CALLS = frozenset({"insert", "raw_insert", "query", "command"})

    def __init__(self, client: Any, flag: Path) -> None:
        self._client = client
        self.flag = flag

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if name not in self.CALLS:
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.flag.exists():
                from clickhouse_connect.driver.exceptions import OperationalError

                raise OperationalError(
                    f"Error HTTPConnectionPool(host='clickhouse', port=8123): connection refused "
                    f"(fault injected: {self.flag} exists)"
                )
            return attr(*args, **kwargs)

        return call


def _with_faults(client: Any) -> Any:
    flag = os.environ.get(FAULT_STORE_DOWN_ENV)
    return StoreDownFault(client, Path(flag)) if flag else client


def open_store(
    cfg: ClickHouseConfig, data_dir: Path, owner_info: dict[str, Any] | None = None, wait_s: float = 0.0
) -> Store:
    try:
        import clickhouse_connect
    except ImportError:
        raise StoreError("ClickHouse access needs clickhouse-connect: pip install 'llmpulse[all]'") from None
    if cfg.embedded:
        directory = store_dir(data_dir)
        lock = StoreLock(directory)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                lock.acquire(owner_info)
                break
            except StoreError:
                # a short-lived holder (a direct `llmpulse query`) lets go within moments
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.2)
        try:
            client = clickhouse_connect.get_client(dsn=f"chdb://{directory}")
        except Exception as exc:
            lock.release()
            raise StoreError(f"cannot open the embedded ClickHouse store in {directory}: {exc}") from None
        return Store(_with_faults(client), lock, cfg)
    url = urlparse(cfg.url)
    try:
        client = clickhouse_connect.get_client(
            host=url.hostname or "localhost",
            port=url.port or (8443 if url.scheme == "https" else 8123),
            username=url.username or os.environ.get("LLMPULSE_SECRET_CLICKHOUSE_USER", "default"),
            password=url.password or os.environ.get("LLMPULSE_SECRET_CLICKHOUSE_PASSWORD", ""),
            secure=url.scheme == "https",
        )
    except Exception as exc:
        raise StoreUnreachable(f"cannot reach ClickHouse at {url.hostname}:{url.port}: {exc}") from None
    return Store(_with_faults(client), None, cfg)
