"""`rtloop run --envs 2 --backend ray` end to end: a real local Ray cluster on loopback (this machine's
cores, 2 on CI), env workers and the policy as Ray actors, the tiny random checkpoint, --sim replay."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from rtloop.runtime.trace import read_trace

pytest.importorskip("ray")


def rtloop(*args) -> list[str]:
    return [sys.executable, "-m", "rtloop", "run", "--metrics-port", "0", "--quiet", *map(str, args)]


@pytest.mark.slow
def test_a_fleet_on_a_local_ray_cluster_ticks_both_envs_and_batches(tiny_checkpoint, tmp_path):
    trace = tmp_path / "trace.jsonl"
    proc = subprocess.run(rtloop("--envs", 2, "--backend", "ray", "--sim", "replay", "--max-steps", 80,
                                 "--checkpoint", tiny_checkpoint, "--trace", trace),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    records = read_trace(trace)
    assert records[0]["backend"] == "ray" and "[Ray actor]" in records[0]["policy"]
    ticks = [r for r in records if r["kind"] == "tick"]
    for env in (0, 1):
        assert [t["step"] for t in ticks if t["env"] == env] == list(range(80))
    infs = [r for r in records if r["kind"] == "inference"]
    assert {r["env"] for r in infs} == {0, 1} and max(r["batch_size"] for r in infs) == 2
    assert sorted((r["env"], r["error"]) for r in records if r["kind"] == "episode") == [(0, None), (1, None)]


def test_an_unreachable_ray_address_is_one_line_and_quick(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    proc = subprocess.run(rtloop("--envs", 1, "--backend", "ray", "--address", f"127.0.0.1:{port}", "--sim", "replay"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and time.monotonic() - t0 < 30
    assert proc.stderr.count("\n") == 1 and f"--address 127.0.0.1:{port}: no Ray cluster answers there" in proc.stderr
