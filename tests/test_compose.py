"""The compose stack, validated without a Docker engine: `docker-compose config` on the
file, pinned images, health checks, mounts that exist and match the configs that read them,
`promtool check config` on the mounted Prometheus config, `amtool check-config` on
Alertmanager's."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from dashboards.promql import DYNAMO_COMPONENTS_JOB, DYNAMO_FRONTEND_JOB, JOB
from dashboards.rules import RULES_FILE, load_rules

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker-compose.yml"
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
ALERTMANAGER_CONFIG = REPO / "deploy" / "alertmanager" / "alertmanager.yml"
SERVICES = {"prometheus", "grafana", "jaeger", "alertmanager", "etcd", "nats"}
PINNED = re.compile(r"^[\w./-]+:v?\d+\.\d+\.\d+(-[\w.]+)?$")

DOCKER_COMPOSE = shutil.which("docker-compose")
PROMTOOL = shutil.which("promtool")
AMTOOL = shutil.which("amtool")


@pytest.fixture(scope="module")
def resolved() -> dict[str, Any]:
    """The compose file as `docker-compose config` resolves it (absolute mount paths)."""
    if DOCKER_COMPOSE is None:
        pytest.skip("docker-compose (Debian docker-compose) is not installed")
    result = subprocess.run(
        [DOCKER_COMPOSE, "--project-directory", str(REPO), "-f", str(COMPOSE), "config"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = yaml.safe_load(result.stdout)
    return data


def raw() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path of each bind mount (named volumes left out)."""
    out: dict[str, Path] = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("/"):
            out[target] = Path(source)
    return out


def test_compose_config_accepts_the_file(resolved: dict[str, Any]) -> None:
    assert set(resolved["services"]) == SERVICES


def test_images_are_pinned_to_exact_versions() -> None:
    images = {name: svc["image"] for name, svc in raw()["services"].items()}
    assert images == {
        "prometheus": "prom/prometheus:v2.55.1",
        "alertmanager": "prom/alertmanager:v0.27.0",
        "grafana": "grafana/grafana:11.6.0",
        "jaeger": "jaegertracing/all-in-one:1.62.0",
        "etcd": "quay.io/coreos/etcd:v3.5.17",
        "nats": "nats:2.10.24-alpine",
    }
    for image in images.values():
        assert PINNED.match(image), image


def test_every_service_has_a_health_check(resolved: dict[str, Any]) -> None:
    for name, svc in resolved["services"].items():
        check = svc.get("healthcheck", {})
        assert check.get("test", [None])[0] == "CMD", name
        assert check["interval"] and check["retries"], name


def test_ports_are_published_on_loopback_only(resolved: dict[str, Any]) -> None:
    published = {
        name: sorted(str(p) for p in svc.get("ports", []))
        for name, svc in resolved["services"].items()
    }
    assert published == {
        "prometheus": ["127.0.0.1:9090:9090/tcp"],
        "alertmanager": ["127.0.0.1:9093:9093/tcp"],
        "grafana": ["127.0.0.1:3000:3000/tcp"],
        "jaeger": [
            "127.0.0.1:16686:16686/tcp",
            "127.0.0.1:4317:4317/tcp",
            "127.0.0.1:4318:4318/tcp",
        ],
        "etcd": ["127.0.0.1:2379:2379/tcp"],
        "nats": ["127.0.0.1:4222:4222/tcp", "127.0.0.1:8222:8222/tcp"],
    }


def test_bind_mounts_come_from_the_repository_and_exist(resolved: dict[str, Any]) -> None:
    mounts = {name: bind_mounts(svc) for name, svc in resolved["services"].items()}
    assert {
        n: {t: s.relative_to(REPO).as_posix() for t, s in m.items()} for n, m in mounts.items() if m
    } == {
        "prometheus": {
            "/etc/prometheus/prometheus.yml": "deploy/prometheus/prometheus.yml",
            "/etc/prometheus/rules": "alerts",
        },
        "alertmanager": {
            "/etc/alertmanager/alertmanager.yml": "deploy/alertmanager/alertmanager.yml"
        },
        "grafana": {
            "/etc/grafana/provisioning": "dashboards/provisioning",
            "/var/lib/grafana/dashboards/dynamo-local": "dashboards/json",
        },
    }
    for service in mounts.values():
        for source in service.values():
            assert source.exists(), source
    for volume in raw()["services"]["prometheus"]["volumes"]:
        assert volume.endswith((":ro", ":/prometheus")), volume


def test_prometheus_reaches_the_host_and_reads_its_mounted_config(resolved: dict[str, Any]) -> None:
    svc = resolved["services"]["prometheus"]
    assert svc["extra_hosts"] == ["host.docker.internal:host-gateway"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in svc["command"]
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert jobs[JOB]["static_configs"] == [{"targets": ["host.docker.internal:8787"]}]
    # Dynamo's processes come from the connector's service discovery, split by role, with
    # the loopback addresses it lists rewritten to the host as the container reaches it.
    to_host = {
        "source_labels": ["__address__"],
        "regex": r"127\.0\.0\.1:(\d+)",
        "target_label": "__address__",
        "replacement": "host.docker.internal:$1",
    }
    for job, roles in (
        (DYNAMO_FRONTEND_JOB, "frontend"),
        (DYNAMO_COMPONENTS_JOB, "worker|router|planner"),
    ):
        assert jobs[job]["http_sd_configs"] == [
            {
                "url": "http://host.docker.internal:8787/v1/prometheus/targets",
                "refresh_interval": "5s",
            }
        ]
        assert jobs[job]["relabel_configs"] == [
            {"source_labels": ["role"], "regex": roles, "action": "keep"},
            to_host,
        ]
    assert config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == [
        "alertmanager:9093"
    ]
    # The rule glob, resolved against the alerts/ mount, loads the rules file and not the
    # promtool unit tests beside it.
    [pattern] = config["rule_files"]
    folder, glob = pattern.rsplit("/", 1)
    assert bind_mounts(svc)[folder] == RULES_FILE.parent
    in_folder = [p.name for p in RULES_FILE.parent.rglob("*.yaml")]
    assert fnmatch.filter(in_folder, glob) == [RULES_FILE.name]


def test_grafana_home_dashboard_is_a_mounted_file(resolved: dict[str, Any]) -> None:
    svc = resolved["services"]["grafana"]
    home = svc["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    folder, name = home.rsplit("/", 1)
    assert (bind_mounts(svc)[folder] / name).is_file()
    assert set(svc["depends_on"]) == {"prometheus", "jaeger"}


def test_grafana_datasources_point_at_compose_services(resolved: dict[str, Any]) -> None:
    datasources = yaml.safe_load(
        (REPO / "dashboards" / "provisioning" / "datasources" / "datasources.yaml").read_text()
    )
    hosts = {re.sub(r"^http://([^:/]+).*$", r"\1", d["url"]) for d in datasources["datasources"]}
    assert hosts <= set(resolved["services"])


@pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian prometheus) missing")
def test_promtool_checks_the_mounted_prometheus_config(tmp_path: Path) -> None:
    # Inside the container the rules are at /etc/prometheus/rules; here they are in alerts/.
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["rule_files"] = [
        str(RULES_FILE.parent / p.rsplit("/", 1)[1]) for p in config["rule_files"]
    ]
    copy = tmp_path / "prometheus.yml"
    copy.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [str(PROMTOOL), "check", "config", str(copy)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {copy} is valid prometheus config file syntax" in result.stdout
    assert f"  SUCCESS: {len(load_rules())} rules found" in result.stdout


@pytest.mark.skipif(AMTOOL is None, reason="amtool (Debian prometheus-alertmanager) missing")
def test_amtool_checks_the_alertmanager_config() -> None:
    result = subprocess.run(
        [str(AMTOOL), "check-config", str(ALERTMANAGER_CONFIG)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    assert " - 2 inhibit rules\n - 1 receivers\n" in result.stdout
