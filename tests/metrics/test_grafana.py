"""grafana/: the committed dashboard is what the generator makes, and the Prometheus/Grafana/compose files fit
together. Docker cannot run here, so the files are parsed and cross-checked; the queries themselves are run
against a real Prometheus in test_live_prometheus.py."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest

from rtloop.metrics.exporter import PrometheusSink
from rtloop.metrics.promapi import DASHBOARD, dashboard_queries
from rtloop.commands.run import add_arguments
from rtloop.runtime.records import RunRecord
from rtloop.serve.command import add_arguments as add_serve_arguments
from rtloop.serve.server import ServerMetrics

GRAFANA = Path(__file__).resolve().parents[2] / "grafana"


def load_yaml(name: str) -> dict:
    return yaml.safe_load((GRAFANA / name).read_text())


def test_committed_dashboard_is_what_the_generator_makes():
    result = subprocess.run([sys.executable, str(GRAFANA / "build_dashboard.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_dashboard_has_the_required_panels_and_only_known_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    queries = dashboard_queries(dashboard)
    titles = {q.panel for q in queries}
    for required in ("processor", "generate", "detokenize", "step", "render", "physics",
                     "Achieved sim and inference rate", "Fresh actions", "Frame and action age",
                     "Overruns and dropped frames", "Success rate", "GPU memory"):
        assert required in titles
    assert sum("histogram_quantile(0.99" in q.expr for q in queries) >= 6  # p99 of every stage

    sink = PrometheusSink()
    sink.on_record(RunRecord({"rate": 10, "suite": "libero_object", "task": 0, "engine": "eager", "policy": "x"}))
    server = ServerMetrics("eager", "random")
    text = generate_latest(sink.registry).decode() + generate_latest(server.registry).decode()
    exported = set(re.findall(r"^(rtloop_\w+?)(?:\{| )", text, re.M))
    used = {name for q in queries for name in re.findall(r"rtloop_\w+", q.expr)}
    assert used and used <= exported, used - exported

    datasources = {json.dumps(p.get("datasource"), sort_keys=True) for p in dashboard["panels"] if "targets" in p}
    assert datasources == {json.dumps({"type": "prometheus", "uid": "prometheus"}, sort_keys=True)}


def test_provisioning_compose_and_prometheus_fit_together():
    compose = load_yaml("docker-compose.yml")["services"]
    prometheus, grafana = compose["prometheus"], compose["grafana"]

    # Every mounted file exists, relative to grafana/ (where compose resolves ./paths).
    mounts = {}
    for service in (prometheus, grafana):
        for volume in service["volumes"]:
            source, target = volume.split(":")[:2]
            assert (GRAFANA / source).exists(), source
            mounts[target] = GRAFANA / source

    # Prometheus scrapes rtloop's default port every second, at an address the container can reach.
    config = load_yaml("prometheus.yml")
    assert mounts["/etc/prometheus/prometheus.yml"] == GRAFANA / "prometheus.yml"
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "rtloop")
    assert job["scrape_interval"] == "1s"
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    default_port = parser.parse_args([]).metrics_port
    assert job["static_configs"][0]["targets"] == [f"localhost:{default_port}"]
    serve_parser = argparse.ArgumentParser()
    add_serve_arguments(serve_parser)
    serve_job = next(j for j in config["scrape_configs"] if j["job_name"] == "rtloop-serve")
    assert serve_job["static_configs"][0]["targets"] == [f"localhost:{serve_parser.parse_args([]).metrics_port}"]
    assert prometheus["network_mode"] == "host"  # so localhost is the host, where rtloop listens on loopback

    # Grafana: the provisioned datasource is the one the dashboard names, at the Prometheus compose starts.
    assert grafana["network_mode"] == "host"
    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    provisioning = mounts["/etc/grafana/provisioning"]
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert datasource["uid"] == "prometheus" and datasource["type"] == "prometheus"
    listen = next(a for a in prometheus["command"] if a.startswith("--web.listen-address="))
    assert datasource["url"].endswith(":" + listen.rsplit(":", 1)[1])

    # The dashboard provider reads the directory the dashboards are mounted at; the home dashboard is ours.
    provider = yaml.safe_load((provisioning / "dashboards" / "rtloop.yml").read_text())["providers"][0]
    dashboards_dir = provider["options"]["path"]
    assert mounts[dashboards_dir] == DASHBOARD.parent
    home = env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_dir}/{DASHBOARD.name}"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) not installed")
def test_promtool_accepts_prometheus_yml():
    result = subprocess.run(["promtool", "check", "config", str(GRAFANA / "prometheus.yml")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
