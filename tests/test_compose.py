"""infra/: the compose file and the Dockerfile agree with the CLI and the config (no Docker here).

- the compose file parses (anchors and merge keys included) and has the services of a
  production-like stack, each with a health check;
- every llmpulse service's command is a real `llmpulse` command with flags that exist
  (parsed by llmpulse.cli.build_parser(), the parser the image's entrypoint runs);
- every LLMPULSE_* variable a service sets is read by the config (load_settings with that
  environment and the mounted config file succeeds) or is a secret llmpulse reads by name;
- the Dockerfile's entrypoint is the `llmpulse` console script and its default command parses.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmpulse.cli import build_parser
from llmpulse.config import load_settings
from llmpulse.config.loader import ENV_ALIASES, ENV_NOT_CONFIG

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
COMPOSE = INFRA / "docker-compose.yml"
DOCKERFILE = INFRA / "Dockerfile"
COMPONENTS = {"proxy", "gpu", "worker", "sink", "notify", "dashboard"}
# what `${VAR:?...}` needs when someone runs the stack (values made up for the test)
TEST_ENV = {
    "CLICKHOUSE_PASSWORD": "pw-test",
    "KEY_HASH_SECRET": "key-hash-test",
    "DASHBOARD_TOKEN": "token-test",
    "GRAFANA_ADMIN_PASSWORD": "grafana-test",
}
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} substitution."""
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            name, op, arg = m.group(1), m.group(2), m.group(3) or ""
            have = env.get(name)
            if op in (":-", "-"):
                return have if have else arg
            if op in (":?", "?"):
                if not have:
                    raise AssertionError(f"${{{name}}} is required: {arg}")
                return have
            return have or ""

        return _VAR.sub(sub, value.replace("$$", "\0")).replace("\0", "$")
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    return value


def compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return interpolate(data, TEST_ENV if env is None else env)  # type: ignore[no-any-return]


def llmpulse_services(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Services that run the llmpulse image (the entrypoint is `llmpulse`)."""
    image = doc["x-llmpulse"]["image"]
    return {name: svc for name, svc in doc["services"].items() if svc.get("image") == image}


def env_of(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def secret_names() -> set[str]:
    """LLMPULSE_SECRET_* names the code reads (each appears literally in the package)."""
    names: set[str] = set()
    for path in (ROOT / "llmpulse").rglob("*.py"):
        names.update(re.findall(r"LLMPULSE_SECRET_[A-Z0-9_]*[A-Z0-9]", path.read_text()))
    return names


def mounted_config(doc: dict[str, Any], svc: dict[str, Any], tmp_path: Path) -> Path:
    """The config file the service gets at LLMPULSE_CONFIG, written where the test can read it."""
    target = env_of(svc)["LLMPULSE_CONFIG"]
    for c in svc.get("configs", []):
        if c["target"] == target:
            path = tmp_path / f"{c['source']}.yaml"
            path.write_text(doc["configs"][c["source"]]["content"])
            return path
    raise AssertionError(f"nothing mounted at {target}")


def container_env(doc: dict[str, Any], svc: dict[str, Any], tmp_path: Path) -> dict[str, str]:
    """The service's environment, LLMPULSE_CONFIG pointing at a local copy of what is mounted there."""
    env = env_of(svc)
    env["LLMPULSE_CONFIG"] = str(mounted_config(doc, svc, tmp_path))
    return env


def parse_command(argv: list[str]) -> argparse.Namespace:
    try:
        return build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse exits on an unknown command or flag
        raise AssertionError(f"`llmpulse {shlex.join(argv)}` does not parse") from exc


def test_compose_parses_and_has_the_stack() -> None:
    doc = compose()
    services = doc["services"]
    assert set(services) >= COMPONENTS
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert "controller" in services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]  # KRaft, no ZooKeeper
    assert "zookeeper" not in json.dumps(doc).lower()
    assert services["clickhouse"]["image"].startswith("clickhouse/clickhouse-server:")
    assert services["prometheus"]["image"].startswith("prom/prometheus")
    assert services["grafana"]["image"].startswith("grafana/grafana")
    for name, svc in services.items():
        if name != "migrate":
            assert "healthcheck" in svc, f"service {name} has no health check"
    # every llmpulse component runs as its own service of the llmpulse image
    mine = llmpulse_services(doc)
    assert {svc["command"][0] for svc in mine.values()} >= COMPONENTS


def test_missing_secret_is_refused() -> None:
    env = {k: v for k, v in TEST_ENV.items() if k != "CLICKHOUSE_PASSWORD"}
    with pytest.raises(AssertionError, match="CLICKHOUSE_PASSWORD"):
        compose(env)


def test_every_command_and_flag_exists() -> None:
    doc = compose()
    for name, svc in llmpulse_services(doc).items():
        argv = svc["command"]
        assert isinstance(argv, list) and argv, f"{name}: command must be an exec-form list"
        args = parse_command([str(a) for a in argv])
        assert args.command == argv[0], name
        assert callable(args.handler)


def test_every_environment_variable_is_read(tmp_path: Path) -> None:
    doc = compose()
    secrets = secret_names()
    assert {"LLMPULSE_SECRET_CLICKHOUSE_PASSWORD", "LLMPULSE_SECRET_DASHBOARD_TOKEN"} <= secrets
    for name, svc in llmpulse_services(doc).items():
        env = env_of(svc)
        config = mounted_config(doc, svc, tmp_path)
        for var in env:
            assert var.startswith("LLMPULSE_"), f"{name}: {var} is not an llmpulse variable"
            rest = var[len("LLMPULSE_") :]
            if rest.startswith("SECRET_"):
                assert var in secrets, f"{name}: {var} is no secret llmpulse reads"
            else:
                assert rest in ENV_ALIASES or rest in ENV_NOT_CONFIG or "__" in rest, f"{name}: {var}"
        # the loader rejects unknown keys, so this proves every variable maps to a real key
        settings = load_settings(None, environ=container_env(doc, svc, tmp_path))
        assert settings.kafka.url == "kafka://kafka:9092"
        assert settings.kafka.bootstrap_servers() == "kafka:9092"
        assert settings.clickhouse.url == "http://clickhouse:8123"
        assert str(settings.data_dir) == "/var/lib/llmpulse"
        assert settings == load_settings(config, environ={k: v for k, v in env.items() if k != "LLMPULSE_CONFIG"})
        # no secret in the mounted file or in a non-secret variable
        assert "pw-test" not in config.read_text()
        for var, value in env.items():
            if value in TEST_ENV.values():
                assert var.startswith("LLMPULSE_SECRET_"), f"{name}: secret in {var}"
        # receivers name the environment variables of their secrets: the service must set them
        for receiver in settings.notify.receivers.values():
            for field in ("webhook_url_env", "token_env", "secret_env"):
                wanted = getattr(receiver, field, None)
                if wanted and svc["command"][0] == "notify":
                    assert wanted in env, f"{name}: receiver needs {wanted}"


def test_servers_listen_where_health_checks_and_prometheus_look(tmp_path: Path) -> None:
    doc = compose()
    services = llmpulse_services(doc)
    ports: dict[str, int] = {}
    for name, svc in services.items():
        settings = load_settings(None, environ=container_env(doc, svc, tmp_path))
        cmd = svc["command"][0]
        if cmd in ("proxy", "ingest", "dashboard"):
            section = getattr(settings, cmd)
            assert section.host == "0.0.0.0", f"{name} must listen on every interface"
            ports[cmd] = section.port
        if cmd in ("notify", "worker"):
            ports[cmd] = getattr(settings, cmd).web_port
            assert ports[cmd] > 0, f"{name}: no metrics port"
        if "healthcheck" not in svc:
            assert svc.get("restart") == "no", f"{name}: a long-running service needs a health check"
            continue
        check = svc["healthcheck"]["test"]
        assert check[0] in ("CMD", "CMD-SHELL")
        if check[:3] == ["CMD", "python", "-c"]:
            compile(check[3], f"{name} healthcheck", "exec")
        if cmd in ports and cmd != "worker":
            assert f"127.0.0.1:{ports[cmd]}/" in " ".join(check), f"{name}: health check on the wrong port"
        for mapping in svc.get("ports", []):
            assert int(str(mapping).split(":")[-1]) == ports[cmd], f"{name}: published port {mapping}"
    prom = yaml.safe_load((INFRA / "prometheus" / "prometheus.yml").read_text())
    targets = {}
    for job in prom["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            for host in sd["names"]:
                targets[host] = sd["port"]
                assert job.get("metrics_path", "/metrics") == "/metrics"
    for host, port in targets.items():
        assert host in services, f"prometheus scrapes {host}, no such service"
        assert ports[services[host]["command"][0]] == port, f"prometheus scrapes {host} on {port}"
    assert set(targets) >= {"proxy", "dashboard", "notify", "worker"}
    assert "/etc/prometheus/alerts.yml" in prom["rule_files"]


def test_mounted_infra_files_exist() -> None:
    doc = compose()
    for name, svc in doc["services"].items():
        for vol in svc.get("volumes", []):
            src = str(vol).split(":", 1)[0]
            if src.startswith("."):
                assert (INFRA / src).exists(), f"{name} mounts {src}, which does not exist"
    prom = doc["services"]["prometheus"]
    assert any(str(v).startswith("./prometheus/prometheus.yml:") for v in prom["volumes"])
    assert any(str(v).startswith("./prometheus/alerts.yml:") for v in prom["volumes"])
    graf = doc["services"]["grafana"]
    assert any(str(v).startswith("./grafana/provisioning:/etc/grafana/provisioning") for v in graf["volumes"])
    # the dashboards provider reads the path the dashboards are mounted at
    provider = yaml.safe_load((INFRA / "grafana" / "provisioning" / "dashboards" / "llmpulse.yaml").read_text())
    paths = {p["options"]["path"] for p in provider["providers"]}
    mounted = {str(v).split(":")[1] for v in graf["volumes"] if str(v).startswith("./grafana/dashboards")}
    assert paths <= mounted
    for secret in prom.get("secrets", []):
        assert secret in doc["secrets"]


def _dockerfile() -> list[tuple[str, str]]:
    lines, cur = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        cur += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            word, _, rest = cur.partition(" ")
            lines.append((word.upper(), rest.strip()))
            cur = ""
    return lines


def test_dockerfile_is_consistent() -> None:
    instr = _dockerfile()
    assert instr[0] == ("FROM", "python:3.11-slim")
    runs = " ".join(rest for word, rest in instr if word == "RUN")
    assert 'pip install ".[all]"' in runs
    entry = json.loads(next(rest for word, rest in instr if word == "ENTRYPOINT"))
    assert entry == ["llmpulse"]
    # the console script the entrypoint runs is the one pyproject installs
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["llmpulse"] == "llmpulse.cli:main"
    assert "all" in project["optional-dependencies"]
    cmd = json.loads(next(rest for word, rest in instr if word == "CMD"))
    with pytest.raises(SystemExit) as exc:  # --help prints the commands and exits 0
        build_parser().parse_args(cmd)
    assert exc.value.code == 0
    # what it copies exists and builds the package
    for word, rest in instr:
        if word == "COPY":
            for src in rest.split()[:-1]:
                assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
    env_lines = " ".join(rest for word, rest in instr if word == "ENV")
    for var in re.findall(r"(LLMPULSE_[A-Z_]+)=", env_lines):
        assert not var.startswith("LLMPULSE_SECRET_"), "no secret in the image"
        load_settings(None, environ={var: "/var/lib/llmpulse"})
    # compose builds this file from the repository root
    doc = compose()
    build = doc["x-llmpulse"]["build"]
    assert (INFRA / build["context"]).resolve() == ROOT
    assert (INFRA / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
