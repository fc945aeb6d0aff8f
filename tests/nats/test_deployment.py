"""The NATS deployments without an engine or a cluster: the compose override
resolves (`docker-compose config`) into a 3-node cluster that every client
lists, and the fleet overlay's server configuration is one nats-server accepts."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import yaml
from nats_harness import nats_server_binary

from _support import require_binary
from audiosockets.jetstream.mapping import NatsSettings
from audiosockets.urls import parse_nats_url

ROOT = Path(__file__).resolve().parents[2]
NODES = ("nats-1", "nats-2", "nats-3")
CLIENTS = {
    "recorder": "RECORD",
    "recorder-demo": "RECORD",
    "processor": "PROCESS",
    "processor-vad": "PROCESS",
    "processor-archive": "PROCESS",
}


def compose_config() -> dict[str, Any]:
    binary = require_binary("docker-compose")
    done = subprocess.run(
        [binary, "-f", "compose.yaml", "-f", "docker/compose.nats.yaml", "--profile", "demo",
         "--profile", "mic", "config"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    config: dict[str, Any] = yaml.safe_load(done.stdout)
    return config


def test_compose_override_is_a_three_node_cluster_every_client_uses() -> None:
    services = compose_config()["services"]
    for node in NODES:
        service = services[node]
        assert service["image"].startswith("nats:")
        args = service["command"]
        assert f"--server_name={node}" in args
        assert "--jetstream" in args
        routes = next(a for a in args if a.startswith("--routes="))
        assert sorted(r.split("//")[1] for r in routes.split("=", 1)[1].split(",")) == [
            f"{n}:6222" for n in NODES
        ]
        (volume,) = service["volumes"]  # docker-compose v1 writes "source:target:mode"
        source, target = str(volume).split(":")[:2]
        assert (source, target) == (node, "/data")  # a store of its own
        assert "healthz" in " ".join(service["healthcheck"]["test"])
    for name, command in CLIENTS.items():
        service = services[name]
        url = service["environment"][f"AUDIOSOCKETS_{command}_RELAY"]
        address = parse_nats_url(url)
        assert address.servers == tuple(f"nats://{n}:4222" for n in NODES)
        assert NatsSettings.from_options(dict(address.options)).replicas == 3
        for node in NODES:
            assert service["depends_on"][node]["condition"] == "service_healthy"


def test_fleet_server_configuration_is_valid(tmp_path: Path) -> None:
    kubectl = require_binary("kubectl")
    done = subprocess.run(
        [kubectl, "kustomize", str(ROOT / "k8s" / "overlays" / "fleet")],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "KUBECONFIG": os.devnull},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (config,) = [
        d["data"]["nats.conf"]
        for d in yaml.safe_load_all(done.stdout)
        if d and d["kind"] == "ConfigMap" and d["metadata"]["name"] == "nats-config"
    ]
    conf = tmp_path / "nats.conf"
    conf.write_text(config.replace("/data", str(tmp_path / "data")))
    checked = subprocess.run(
        [nats_server_binary(), "-c", str(conf), "-t"],
        capture_output=True, text=True, timeout=30, check=False,
        env={**os.environ, "POD_NAME": "nats-0"},
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_prometheus_scrapes_every_nats_server_through_its_exporter() -> None:
    services = compose_config()["services"]
    prometheus_dir = ROOT / "grafana" / "prometheus"
    base = yaml.safe_load((prometheus_dir / "prometheus.yml").read_text())
    nats = yaml.safe_load((prometheus_dir / "prometheus-nats.yml").read_text())
    assert "--config.file=/etc/prometheus/prometheus-nats.yml" in services["prometheus"]["command"]
    # The same stack as prometheus.yml, plus one job.
    added = [j for j in nats["scrape_configs"] if j not in base["scrape_configs"]]
    assert [j for j in nats["scrape_configs"] if j not in added] == base["scrape_configs"]
    assert {k: v for k, v in nats.items() if k != "scrape_configs"} == {
        k: v for k, v in base.items() if k != "scrape_configs"
    }
    (job,) = added
    assert job["job_name"] == "nats"
    (sd,) = job["dns_sd_configs"]
    exporters = sorted(sd["names"])
    assert exporters == [f"nats-exporter-{i}" for i in (1, 2, 3)]
    for exporter, node in zip(exporters, NODES, strict=True):
        args = services[exporter]["command"]
        assert f"http://{node}:8222" in args  # the server's monitoring port
        assert "-jsz=all" in args  # JetStream: streams, consumers, replicas
        assert f"-port={sd['port']}" in args
    promtool = require_binary("promtool")
    checked = subprocess.run(
        [promtool, "check", "config", "prometheus-nats.yml"],
        cwd=prometheus_dir, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
