"""A real Prometheus server scrapes a live `rtloop run` on LIBERO beside a live fleet (`rtloop run --envs 2` on
replayed LIBERO frames) (and, for the server row, a live `rtloop serve` driven by rtloop's client), and every PromQL expression of the committed Grafana dashboard is evaluated
through Prometheus' HTTP API: each must parse and return data."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from rtloop.metrics.promapi import DASHBOARD, LocalPrometheus, dashboard_queries, expand, free_port

# What Grafana substitutes for $__rate_interval is max(4 x scrape interval, step + scrape interval): 4 s at
# fine zoom. This 2-core machine may run the tiny model at under 1 Hz while other tests run, so the test
# uses a wider window, one that still holds several 1 s scrapes of this run only.
RATE_INTERVAL = "15s"
SERVER_ROW = "Policy server (rtloop serve)"  # grafana/build_dashboard.py: its panels read rtloop serve's series
WAIT_S = 180  # for LIBERO to load, the first episode to end and enough scrapes to fill the window


def finite_values(result: list[dict]) -> list[float]:
    return [float(r["value"][1]) for r in result if math.isfinite(float(r["value"][1]))]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("prometheus") is None,
                    reason="no prometheus binary on PATH: `make prometheus` installs Debian's package (needs root)")
def test_every_dashboard_query_returns_data_from_a_live_run(tiny_checkpoint, tmp_path):
    port, fleet_port = free_port(), free_port()
    common = ["--rate", "10", "--episodes", "50", "--max-steps", "12", "--checkpoint", str(tiny_checkpoint), "--quiet"]
    run = subprocess.Popen(
        [sys.executable, "-m", "rtloop", "run", *common, "--metrics-port", str(port),
         "--trace", str(tmp_path / "run" / "trace.jsonl")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "MUJOCO_GL": "egl"},
    )
    # The fleet's episodes last longer (replay has 50 init states, 2 envs get through them fast): it must
    # outlive LIBERO's start, up to WAIT_S (25 episodes per env of 8 s each), and end its first episode before
    # LIBERO ends its first.
    fleet = subprocess.Popen(
        [sys.executable, "-m", "rtloop", "run", *common, "--max-steps", "80", "--envs", "2", "--sim", "replay",
         "--metrics-port", str(fleet_port), "--trace", str(tmp_path / "fleet" / "trace.jsonl")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        with LocalPrometheus([f"127.0.0.1:{port}", f"127.0.0.1:{fleet_port}"], tmp_path / "prometheus") as prom:
            api = prom.api
            # Ready when an episode has ended (the success rate needs one) and the rate window is full.
            deadline = time.monotonic() + WAIT_S
            while True:
                assert run.poll() is None, f"rtloop run exited early ({run.returncode}):\n{run.stdout.read()}"
                assert fleet.poll() is None, f"the fleet exited early ({fleet.returncode}):\n{fleet.stdout.read()}"
                assert time.monotonic() < deadline, f"no complete data after {WAIT_S} s; targets up: {api.targets_up()}"
                per_run = finite_values(api.query("sum by (instance) (rtloop_episodes_total)"))  # both runs
                episodes = [min(per_run)] if len(per_run) == 2 else []
                scrapes = finite_values(api.query(f"count_over_time(rtloop_ticks_total[{RATE_INTERVAL}])"))
                inferences = finite_values(api.query(f"increase(rtloop_inferences_total[{RATE_INTERVAL}])"))
                if (episodes and episodes[0] >= 1 and len(scrapes) == 2 and min(scrapes) >= 5
                        and len(inferences) == 2 and min(inferences) > 0):
                    break
                time.sleep(1)

            # The dashboard's variables, as Grafana fills them from the run's labels.
            variables = {}
            for name in ("suite", "task", "engine"):
                values = api.label_values(name, "rtloop_run_info")
                assert len(values) == 1, (name, values)
                variables[name] = values[0]
            assert (variables["suite"], variables["task"]) == ("libero_object", "0")  # the run's defaults

            queries = [q for q in dashboard_queries(json.loads(DASHBOARD.read_text())) if q.row != SERVER_ROW]
            assert len(queries) >= 40
            failures = evaluate(api, queries, variables)
            assert not failures, "\n".join(failures)

            # Spot-check that the data is this run's: 10 Hz configured, LIBERO's render inside its step.
            assert finite_values(api.query("max(rtloop_configured_rate_hertz)")) == [10.0]
            render = api.query('sum(rtloop_stage_duration_seconds_sum{stage="render"})')
            step = api.query('sum(rtloop_stage_duration_seconds_sum{stage="step"})')
            assert 0 < finite_values(render)[0] <= finite_values(step)[0]
            # The fleet's per-env series: one per env of each run (env 1 only in the fleet), bounded by N.
            assert finite_values(api.query("max(rtloop_fleet_envs)")) == [2.0]
            envs = {r["metric"]["env"] for r in api.query("sum by (env) (rtloop_env_actions_total)")}
            assert envs == {"0", "1"}
            assert finite_values(api.query("max(rtloop_inference_batch_size_sum - rtloop_inference_batch_size_count)"))[0] > 0
    finally:
        for proc in (run, fleet):  # Ctrl-C to both at once: each cleans up, prints its summary, exits 130
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        try:
            output, fleet_output = (proc.communicate(timeout=60)[0] for proc in (run, fleet))
        except subprocess.TimeoutExpired:
            run.kill()
            fleet.kill()
            raise
    assert run.returncode == 130, output
    assert fleet.returncode == 130, fleet_output


def evaluate(api, queries, variables) -> list[str]:
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
    return failures


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("prometheus") is None,
                    reason="no prometheus binary on PATH: `make prometheus` installs Debian's package (needs root)")
def test_every_server_panel_query_returns_data_from_a_live_server(tiny_checkpoint, tmp_path):
    from rtloop.serve.client import RemotePolicy
    from rtloop.serve.protocol import pack
    from rtloop.sim.base import Observation
    from websockets.sync.client import connect

    metrics_port, log = free_port(), tmp_path / "serve.log"
    with open(log, "wb") as out:
        serve = subprocess.Popen([sys.executable, "-m", "rtloop", "serve", "--port", "0", "--checkpoint",
                                  str(tiny_checkpoint), "--metrics-port", str(metrics_port)],
                                 stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    stop = threading.Event()
    client = None
    try:
        # Prometheus first: its first scrape comes ~5 s after it starts (target discovery), while the server loads.
        with LocalPrometheus([f"127.0.0.1:{metrics_port}"], tmp_path / "prometheus") as prom:
            api = prom.api
            deadline = time.monotonic() + WAIT_S
            while not (m := re.search(r"listening on (ws://127\.0\.0\.1:\d+)", log.read_text())):
                assert serve.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
            url = m.group(1)
            with connect(url) as ws:  # one refused request, so the error counters have moved
                ws.recv()
                ws.send(pack({"image": np.zeros((4, 4, 1), np.uint8), "instruction": "x"}))
                assert "bad_shape" in ws.recv()
            frame = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
            policy = RemotePolicy(url)

            def drive():  # requests the whole time Prometheus scrapes
                while not stop.is_set():
                    policy.act(Observation(frame), "pick up the alphabet soup")

            client = threading.Thread(target=drive, name="test-serve-client")
            client.start()
            while True:
                assert client.is_alive() and serve.poll() is None, log.read_text()
                assert time.monotonic() < deadline, f"no complete data after {WAIT_S} s; targets up: {api.targets_up()}"
                scrapes = finite_values(api.query(f"count_over_time(rtloop_server_info[{RATE_INTERVAL}])"))
                answered = finite_values(api.query(f"increase(rtloop_server_requests_total[{RATE_INTERVAL}])"))
                if scrapes and scrapes[0] >= 5 and answered and max(answered) > 0:
                    break
                time.sleep(1)
            engines = api.label_values("engine", "rtloop_server_info")
            assert engines == ["eager"]  # the CPU default
            queries = [q for q in dashboard_queries(json.loads(DASHBOARD.read_text())) if q.row == SERVER_ROW]
            assert len(queries) >= 6
            failures = evaluate(api, queries, {"engine": engines[0]})
            assert not failures, "\n".join(failures)
            bad = api.query('sum(rtloop_server_errors_total{kind="bad_shape"})')
            assert finite_values(bad) == [1.0]
    finally:
        stop.set()
        if client is not None:
            client.join(timeout=60)
        if serve.poll() is None:
            serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=60)
    assert serve.returncode == 0, log.read_text()
