"""Talk to a real Prometheus server: start a local one scraping rtloop, run PromQL through its HTTP API, and
pull the queries out of the committed Grafana dashboard. Used by the dashboard test and by
grafana/render_panels.py; a user without Docker can use it to keep a run's metrics too.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from rtloop.children import stop
from rtloop.errors import MetricsError

DASHBOARD = Path(__file__).resolve().parents[2] / "grafana" / "dashboards" / "rtloop.json"


@dataclass
class PanelQuery:
    panel: str  # panel title
    legend: str  # legendFormat ("__auto" when Grafana picks)
    expr: str  # PromQL, with Grafana's $variables still in it
    instant: bool
    row: str = ""  # the title of the row the panel sits under ("" above the first row)


def dashboard_queries(dashboard: dict) -> list[PanelQuery]:
    """Every PromQL target of every panel, rows included."""
    out = []
    row = ""
    for top in dashboard.get("panels", []):
        if top.get("type") == "row":
            row = top.get("title", "")
        for panel in [top, *(top.get("panels") or [])]:  # collapsed rows keep their panels inside
            for target in panel.get("targets") or []:
                if target.get("expr"):
                    out.append(PanelQuery(panel["title"], target.get("legendFormat", ""), target["expr"],
                                          bool(target.get("instant")), row))
    return out


def expand(expr: str, variables: dict[str, str], rate_interval: str = "4s", range_: str = "5m") -> str:
    """Substitute what Grafana would: dashboard variables (as regex values), $__rate_interval (Grafana uses
    max(4 x scrape interval, step + scrape interval): 4s at a 1 s scrape and fine zoom) and $__range."""
    expr = expr.replace("$__rate_interval", rate_interval).replace("$__range", range_)
    for name, value in variables.items():
        expr = expr.replace(f"${name}", value)
    if re.search(r"\$\w+", expr):
        raise ValueError(f"unsubstituted variable in {expr!r}")
    return expr


@dataclass
class PrometheusAPI:
    url: str  # e.g. http://127.0.0.1:9090

    def _get(self, path: str, **params) -> dict:
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as e:  # PromQL errors come back as 400/422 with a JSON body
            body = json.load(e)
        if body.get("status") != "success":
            raise MetricsError(f"Prometheus {path} failed: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self._get("/api/v1/query", query=expr)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        return self._get("/api/v1/query_range", query=expr, start=start, end=end, step=step)["result"]

    def label_values(self, label: str, match: str) -> list[str]:
        return self._get(f"/api/v1/label/{label}/values", **{"match[]": match})

    def targets_up(self) -> int:
        return sum(t["health"] == "up" for t in self._get("/api/v1/targets")["activeTargets"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalPrometheus:
    """A Prometheus server on loopback with its own config and storage under `workdir`, scraping `targets`
    (host:port) every second. Use as a context manager; the server is stopped on exit."""

    def __init__(self, targets: list[str], workdir: Path, binary: str = "prometheus", scrape_interval: str = "1s"):
        self.binary = shutil.which(binary)
        if self.binary is None:
            raise MetricsError(f"{binary} not found: install Prometheus (Debian: apt-get install prometheus)")
        self.workdir = Path(workdir)
        self.targets = targets
        self.scrape_interval = scrape_interval
        self.port = free_port()
        self.api = PrometheusAPI(f"http://127.0.0.1:{self.port}")
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> LocalPrometheus:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": self.scrape_interval, "evaluation_interval": self.scrape_interval},
            "scrape_configs": [{"job_name": "rtloop", "scrape_timeout": self.scrape_interval,
                                "static_configs": [{"targets": self.targets}]}],
        }))
        self.log = open(self.workdir / "prometheus.log", "wb")
        self.process = subprocess.Popen(
            [self.binary, f"--config.file={config}", f"--storage.tsdb.path={self.workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-lifecycle"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.__exit__()
                raise MetricsError(f"prometheus exited at start: see {self.workdir / 'prometheus.log'}")
            try:
                with urllib.request.urlopen(f"{self.api.url}/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        self.__exit__()
        raise MetricsError(f"prometheus did not become ready in 30 s: see {self.workdir / 'prometheus.log'}")

    def __exit__(self, *exc) -> None:
        if self.process is not None:
            stop(self.process, grace_s=15)
        self.log.close()
