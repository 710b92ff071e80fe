"""Fixtures: a real Tansu broker on a free port, real chDB directories under tmp paths."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from llmpulse.config import Settings, load_settings
from llmpulse.embedded.broker import EmbeddedBroker
from llmpulse.kafka.topics import ensure_topics


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    b = EmbeddedBroker(0, log_dir=tmp_path_factory.mktemp("broker"))
    b.start()
    yield b
    b.stop()


@pytest.fixture
def make_settings(broker: EmbeddedBroker, tmp_path: Path) -> Callable[..., Settings]:
    """Settings on the session broker with topics of their own (a fresh prefix) and a fresh store."""

    def make(**overrides: Any) -> Settings:
        prefix = f"t{uuid.uuid4().hex[:10]}."
        base: dict[str, Any] = {
            "data_dir": str(tmp_path / "data"),
            "kafka.url": f"kafka://{broker.bootstrap}",
            "kafka.topic_prefix": prefix,
        }
        base.update(overrides)
        settings = _load(base)
        ensure_topics(broker.bootstrap, settings.kafka)
        return settings

    def _load(overrides: dict[str, Any]) -> Settings:
        return load_settings(None, environ={}, overrides=overrides)

    return make


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()
