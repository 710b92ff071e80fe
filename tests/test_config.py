"""Configuration: defaults with no file, file + environment, and errors that name file and key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from llmpulse.config import ConfigError, load_settings


def test_no_file_gives_embedded_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = load_settings(environ={})
    assert s.kafka.embedded and s.clickhouse.embedded
    assert s.worker.windows_s == [10, 60]
    assert s.data_dir == Path(".llmpulse")


def test_file_then_environment(tmp_path: Path) -> None:
    f = tmp_path / "llmpulse.yaml"
    f.write_text("kafka:\n  partitions: 6\nworker:\n  grace_s: 2\n")
    s = load_settings(f, environ={"LLMPULSE_WORKER__GRACE_S": "7.5", "LLMPULSE_KAFKA": "kafka://k1:9092,k2:9092"})
    assert s.kafka.partitions == 6
    assert s.worker.grace_s == 7.5
    assert s.kafka.bootstrap_servers() == "k1:9092,k2:9092"


def test_wrong_type_names_file_and_key(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("kafka:\n  partitions: three\n")
    with pytest.raises(ConfigError) as exc:
        load_settings(f, environ={})
    msg = str(exc.value)
    assert str(f) in msg and "kafka.partitions" in msg and "integer" in msg


def test_unknown_key_is_an_error(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("sink:\n  batch_rowz: 10\n")
    with pytest.raises(ConfigError, match=r"sink\.batch_rowz.*unknown key"):
        load_settings(f, environ={})


def test_environment_errors_name_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"environment variable LLMPULSE_WORKER__WINDOWS_S"):
        load_settings(None, environ={"LLMPULSE_WORKER__WINDOWS_S": "[10, -5]"})
    with pytest.raises(ConfigError, match=r"LLMPULSE_NOPE.*unknown key"):
        load_settings(None, environ={"LLMPULSE_NOPE": "1"})


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.yaml", environ={})


def test_cli_stops_with_the_message_not_a_traceback(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("kafka:\n  url: redis://x\n")
    r = subprocess.run([sys.executable, "-m", "llmpulse", "--config", str(f), "query", "SELECT 1"],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 2
    assert "kafka.url" in r.stderr and "kafka://host:port" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("worker:\n  windows_s: " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper than 32 levels"),
        ("worker:\n  windows_s: " + "[" * 40 + "]" * 40 + "\n", "nested deeper than 32 levels (at 'worker.windows_s.0.0.0.0.0.0...')"),
        # the "billion laughs": a few hundred bytes that expand to 9**9 values
        ("a: &a [x, x, x, x, x, x, x, x, x]\n"
         + "".join(f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
                   for p, c in zip("abcdefgh", "bcdefghi", strict=True)),
         "more than 1000000 values"),
    ],
)  # fmt: skip
def test_pathological_yaml_stops_with_file_and_limit(tmp_path: Path, text: str, reason: str) -> None:
    f = tmp_path / "deep.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_settings(f, environ={})
    assert str(exc.value).startswith(f"{f}: ") and reason in str(exc.value)
    with pytest.raises(ConfigError, match=r"environment variable LLMPULSE_WORKER__WINDOWS_S: nested deeper than 32"):
        load_settings(None, environ={"LLMPULSE_WORKER__WINDOWS_S": "[" * 5000 + "]" * 5000})


def test_oversized_config_file_stops_with_the_limit(tmp_path: Path) -> None:
    f = tmp_path / "big.yaml"
    f.write_text("# padding\n" * 500_000)
    with pytest.raises(ConfigError, match=r"big\.yaml: larger than 4194304 bytes"):
        load_settings(f, environ={})


def test_wrong_type_shows_a_short_value(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("kafka:\n  partitions: " + "x" * 10_000 + "\n")
    with pytest.raises(ConfigError) as exc:
        load_settings(f, environ={})
    assert "kafka.partitions" in str(exc.value) and len(str(exc.value)) < 400
