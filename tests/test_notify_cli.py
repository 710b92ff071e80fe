"""`llmpulse silence add|list|expire` and `llmpulse alerts tail`, against the real broker."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from llmpulse.cli import main
from llmpulse.config import Settings
from llmpulse.schemas import Alert
from tests.test_notify import make_alert, publish


def write_config(settings: Settings, tmp_path: Path) -> str:
    path = tmp_path / "cli.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "data_dir": str(tmp_path / "data"),
                "kafka": {"url": settings.kafka.url, "topic_prefix": settings.kafka.topic_prefix},
            }
        )
    )
    return str(path)


def test_silence_add_list_expire(
    make_settings: Callable[..., Settings], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(make_settings(), tmp_path)
    assert main(["--config", cfg, "silence", "add", "--rule", "error_*", "-d", "model=gpt-4*", "--duration", "2h",
                 "--comment", "deploy", "--by", "ana"]) == 0
    silence_id = capsys.readouterr().out.strip()
    assert main(["--config", cfg, "silence", "list"]) == 0
    out = capsys.readouterr().out
    assert silence_id in out and "active" in out and "rule=error_*" in out and "dims=model=gpt-4*" in out
    assert "by=ana" in out and "deploy" in out
    assert main(["--config", cfg, "silence", "expire", silence_id]) == 0
    assert f"expired {silence_id}" in capsys.readouterr().out
    assert main(["--config", cfg, "silence", "list"]) == 0
    assert capsys.readouterr().out.strip() == "no active silences"
    assert main(["--config", cfg, "silence", "list", "--all", "--json"]) == 0
    (listed,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert listed["silence_id"] == silence_id and listed["dimensions"] == {"model": "gpt-4*"}
    # clear errors
    assert main(["--config", cfg, "silence", "expire", "nope"]) == 1
    assert "no silence with id 'nope'" in capsys.readouterr().err
    assert main(["--config", cfg, "silence", "add", "--duration", "1h"]) == 1
    assert "would mute everything" in capsys.readouterr().err
    assert main(["--config", cfg, "silence", "add", "--rule", "x", "--duration", "soon"]) == 1
    assert "invalid duration" in capsys.readouterr().err


def test_alerts_tail_prints_lines_and_json(
    make_settings: Callable[..., Settings], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings()
    cfg = write_config(settings, tmp_path)
    alerts = [
        make_alert(severity="critical", value=0.31),
        make_alert(rule="latency_avg", dims={"model": "m1", "app": "chat"}, state="resolved"),
    ]
    publish(settings, alerts)
    assert main(["--config", cfg, "alerts", "tail", "--from-beginning", "--json", "-n", "2", "--timeout", "60"]) == 0
    lines = capsys.readouterr().out.splitlines()
    got = sorted((Alert.model_validate_json(line) for line in lines), key=lambda a: a.rule)
    assert {a.alert_id for a in got} == {a.alert_id for a in alerts}
    assert main(["--config", cfg, "alerts", "tail", "--from-beginning", "-n", "2", "--timeout", "60"]) == 0
    text = capsys.readouterr().out
    assert "CRITICAL error_rate [model=gpt-4o] error_rate=0.31 threshold=0.05 window 12:00:00-12:01:00" in text
    assert "RESOLVED latency_avg [app=chat,model=m1]" in text
