"""Render the dashboard's panels to a PNG from real Prometheus data, laid out as in Grafana.

This is not a Grafana screenshot: each panel's PromQL expressions are run as range queries against a real
Prometheus and plotted with matplotlib, for places where Grafana itself cannot run.

    # start a local Prometheus and an `rtloop run`, render once the run ends:
    python grafana/render_panels.py --out grafana/dashboard.png -- --rate 10 --episodes 3 --max-steps 60
    # or from a Prometheus that already scraped a run (the last 15 minutes):
    python grafana/render_panels.py --prometheus http://localhost:9090 --minutes 15
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rtloop.metrics.promapi import DASHBOARD, LocalPrometheus, PrometheusAPI, dashboard_queries, expand, free_port

UNIT_SCALE = {"s": (1e3, "ms"), "bytes": (2**-20, "MiB"), "percentunit": (100, "%"), "hertz": (1, "Hz"),
              "ops": (1, "/s"), "none": (1, "")}


def legend(fmt: str, metric: dict, expr: str) -> str:
    if fmt and fmt != "__auto":
        return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: metric.get(m.group(1), ""), fmt)
    labels = {k: v for k, v in metric.items() if k not in ("suite", "task", "engine", "job", "instance")}
    return ", ".join(f"{k}={v}" for k, v in labels.items()) or expr[:40]


def render(api: PrometheusAPI, start: float, end: float, out: Path, rate_interval: str, note: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dashboard = json.loads(DASHBOARD.read_text())
    variables = {name: ".*" for name in ("suite", "task", "engine")}  # "All"
    step = max(1.0, (end - start) / 400)
    queries = dashboard_queries(dashboard)
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in dashboard["panels"])
    fig = plt.figure(figsize=(24, rows * 0.42))
    fig.suptitle(f"{dashboard['title']}: panels rendered from Prometheus query results (matplotlib, not a "
                 f"Grafana screenshot)\n{note}; $__rate_interval = {rate_interval}", fontsize=13)
    top, bottom = 0.965, 0.02
    h_unit = (top - bottom) / rows

    def box(grid):  # Grafana's 24-column grid to figure coordinates
        return [grid["x"] / 24 + 0.025, top - (grid["y"] + grid["h"]) * h_unit + 0.012,
                grid["w"] / 24 - 0.035, grid["h"] * h_unit - 0.03]

    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        if panel["type"] == "row":
            fig.text(0.01, top - grid["y"] * h_unit - 0.006, panel["title"], fontsize=12, weight="bold")
            continue
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "none")
        scale, suffix = UNIT_SCALE.get(unit, (1, unit))
        ax = fig.add_axes(box(grid))
        title, last = panel["title"], None
        for q in (q for q in queries if q.panel == panel["title"]):
            expr = expand(q.expr, variables, rate_interval)
            for series in api.query_range(expr, start, end, step):
                points = [(float(t) - start, float(v) * scale) for t, v in series["values"] if math.isfinite(float(v))]
                if not points:
                    continue
                ax.plot(*zip(*points), linewidth=1, label=legend(q.legend, series["metric"], expr))
                last = points[-1][1]
        if panel["type"] in ("stat", "table") and last is not None:
            title = f"{title}: {last:.3g} {suffix}".rstrip()
        ax.set_title(title, fontsize=9, loc="left")
        ax.tick_params(labelsize=7)
        ax.set_ylabel(suffix, fontsize=7)
        ax.set_xlim(0, end - start)
        if panel["type"] == "timeseries" and ax.lines:
            ax.legend(fontsize=6, loc="upper left", ncol=2)
        ax.grid(alpha=0.3)
    fig.text(0.5, 0.004, "seconds since the start of the window", ha="center", fontsize=9)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=70)
    print(f"wrote {out}")


def run_and_render(run_args: list[str], out: Path, rate_interval: str) -> int:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="rtloop-render-") as tmp:
        with LocalPrometheus([f"127.0.0.1:{port}"], Path(tmp) / "prometheus") as prom:
            start = time.time()
            cmd = [sys.executable, "-m", "rtloop", "run", *run_args, "--metrics-port", str(port), "--quiet"]
            if "--trace" not in run_args:  # keep the trace out of runs/: the picture is what this is for
                cmd += ["--trace", str(Path(tmp) / "trace.jsonl")]
            print(" ".join(cmd[2:]), flush=True)
            code = subprocess.run(cmd, env={**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}).returncode
            end = time.time()
            if code != 0:
                print(f"rtloop run exited {code}", file=sys.stderr)
                return code
            note = f"live `rtloop run {' '.join(run_args)}` on {os.uname().nodename}"
            render(prom.api, start, end, out, rate_interval, note)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "dashboard.png")
    parser.add_argument("--prometheus", help="URL of a Prometheus that already scraped a run")
    parser.add_argument("--minutes", type=float, default=15, help="with --prometheus: how far back to plot")
    parser.add_argument("--rate-interval", default="4s", help="what $__rate_interval becomes (Grafana: 4s at 1 s "
                                                              "scrapes, more when zoomed out)")
    parser.add_argument("run_args", nargs="*", help="after --: arguments for `rtloop run`")
    args = parser.parse_args()
    if args.prometheus:
        end = time.time()
        render(PrometheusAPI(args.prometheus), end - args.minutes * 60, end, args.out, args.rate_interval,
               f"from {args.prometheus}")
        return 0
    return run_and_render(args.run_args, args.out, args.rate_interval)


if __name__ == "__main__":
    sys.exit(main())
