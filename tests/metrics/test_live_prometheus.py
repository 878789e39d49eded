"""A real Prometheus server scrapes a live `rtloop run` on LIBERO, and every PromQL expression of the committed
Grafana dashboard is evaluated through Prometheus' HTTP API: each must parse and return data."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from rtloop.metrics.promapi import DASHBOARD, LocalPrometheus, dashboard_queries, expand, free_port

# What Grafana substitutes for $__rate_interval is max(4 x scrape interval, step + scrape interval): 4 s at
# fine zoom. This 2-core machine may run the tiny model at under 1 Hz while other tests run, so the test
# uses a wider window, one that still holds several 1 s scrapes of this run only.
RATE_INTERVAL = "15s"
WAIT_S = 150  # for LIBERO to load, the first episode to end and enough scrapes to fill the window


def finite_values(result: list[dict]) -> list[float]:
    return [float(r["value"][1]) for r in result if math.isfinite(float(r["value"][1]))]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("prometheus") is None,
                    reason="no prometheus binary on PATH: `make prometheus` installs Debian's package (needs root)")
def test_every_dashboard_query_returns_data_from_a_live_run(tiny_checkpoint, tmp_path):
    port = free_port()
    run = subprocess.Popen(
        [sys.executable, "-m", "rtloop", "run", "--rate", "10", "--episodes", "50", "--max-steps", "12",
         "--checkpoint", str(tiny_checkpoint), "--metrics-port", str(port), "--quiet",
         "--trace", str(tmp_path / "run" / "trace.jsonl")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "MUJOCO_GL": "egl"},
    )
    try:
        with LocalPrometheus([f"127.0.0.1:{port}"], tmp_path / "prometheus") as prom:
            api = prom.api
            # Ready when an episode has ended (the success rate needs one) and the rate window is full.
            deadline = time.monotonic() + WAIT_S
            while True:
                assert run.poll() is None, f"rtloop run exited early ({run.returncode}):\n{run.stdout.read()}"
                assert time.monotonic() < deadline, f"no complete data after {WAIT_S} s; targets up: {api.targets_up()}"
                episodes = finite_values(api.query("sum(rtloop_episodes_total)"))
                scrapes = finite_values(api.query(f"count_over_time(rtloop_ticks_total[{RATE_INTERVAL}])"))
                inferences = finite_values(api.query(f"increase(rtloop_inferences_total[{RATE_INTERVAL}])"))
                if episodes and episodes[0] >= 1 and scrapes and scrapes[0] >= 5 and inferences and inferences[0] > 0:
                    break
                time.sleep(1)

            # The dashboard's variables, as Grafana fills them from the run's labels.
            variables = {}
            for name in ("suite", "task", "engine"):
                values = api.label_values(name, "rtloop_run_info")
                assert len(values) == 1, (name, values)
                variables[name] = values[0]
            assert (variables["suite"], variables["task"]) == ("libero_object", "0")  # the run's defaults

            queries = dashboard_queries(json.loads(DASHBOARD.read_text()))
            assert len(queries) >= 40
            failures = []
            for q in queries:
                expr = expand(q.expr, variables, rate_interval=RATE_INTERVAL)
                try:
                    result = api.query(expr)
                except Exception as e:  # a PromQL error: collect them all, then fail
                    failures.append(f"{q.panel} / {q.legend}: {e}")
                    continue
                if not finite_values(result):
                    failures.append(f"{q.panel} / {q.legend}: no data ({result}) for {expr}")
            assert not failures, "\n".join(failures)

            # Spot-check that the data is this run's: 10 Hz configured, LIBERO's render inside its step.
            assert finite_values(api.query("max(rtloop_configured_rate_hertz)")) == [10.0]
            render = api.query('sum(rtloop_stage_duration_seconds_sum{stage="render"})')
            step = api.query('sum(rtloop_stage_duration_seconds_sum{stage="step"})')
            assert 0 < finite_values(render)[0] <= finite_values(step)[0]
    finally:
        if run.poll() is None:
            run.send_signal(signal.SIGINT)  # Ctrl-C: the run cleans up, prints its summary, exits 130
        try:
            output = run.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            run.kill()
            raise
    assert run.returncode == 130, output
