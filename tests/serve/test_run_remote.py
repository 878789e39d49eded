"""`rtloop run --policy ws://...` end to end: a real `rtloop serve` subprocess (tiny random-weight checkpoint,
loopback) driving real LIBERO through a real `rtloop run` subprocess."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from rtloop.runtime.trace import read_trace

pytestmark = pytest.mark.slow


def disconnects(server) -> float:
    """The server's count of clients that left mid-request or without a closing handshake."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    text = urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "rtloop_server_errors_total" and s.labels.get("kind") == "disconnected")


def test_run_against_rtloop_serve_on_libero_times_the_hop(server, tmp_path):
    """...and ends its connection cleanly: the request in flight when the episode ends gets its answer, and is
    not sent again on a new connection that the exit then drops."""
    trace = tmp_path / "trace.jsonl"
    before = disconnects(server)
    cmd = [sys.executable, "-m", "rtloop", "run", "--policy", server.url, "--max-steps", "15", "--metrics-port", "0",
           "--quiet", "--trace", str(trace),
           "--max-action-age", "60"]  # a loaded machine's slow answer is applied, not stopped: the hop is under test
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, MUJOCO_GL="egl", PYOPENGL_PLATFORM="egl"))
    assert proc.returncode == 0, proc.stderr
    assert disconnects(server) == before
    records = read_trace(trace)
    header = records[0]
    assert header["kind"] == "run" and header["policy_kind"] == "remote" and header["sim"] == "libero"
    ticks = [r for r in records if r["kind"] == "tick"]
    assert len(ticks) == 15
    infs = [r for r in records if r["kind"] == "inference"]
    assert infs
    for inf in infs:
        stages = inf["stages"]
        assert {"round_trip", "server_infer", "network"} <= set(stages)
        assert 0 < stages["server_infer"] < stages["round_trip"]
        assert stages["network"] == pytest.approx(stages["round_trip"] - stages["server_infer"]
                                                  - stages.get("server_queue", 0.0), abs=1e-6)
    # the tiny server answers one action: no chunks, so the runtime behaves as without them
    assert all(t["chunk_index"] is None for t in ticks)
    assert "chunk" not in {t["action_source"] for t in ticks}
    assert any(t["action_source"] == "fresh" for t in ticks)
