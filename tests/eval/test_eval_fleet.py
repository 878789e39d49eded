"""`rtloop eval` on the fleet (one batched policy, N env workers) as a user runs it: real CLI processes,
real LIBERO or recorded frames, the tiny random-weight checkpoint, a real local Ray cluster."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from rtloop.runtime.trace import read_trace

EGL = {**os.environ, "MUJOCO_GL": "egl", "PYOPENGL_PLATFORM": "egl"}
INSTRUCTIONS = {0: "pick up the alphabet soup and place it in the basket",
                1: "pick up the cream cheese and place it in the basket",
                2: "pick up the salad dressing and place it in the basket"}


def rtloop_eval(*args) -> list[str]:
    return [sys.executable, "-m", "rtloop", "eval", *map(str, args)]


def result_rows(out):
    lines = (out / "results.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines[1:]]


@pytest.mark.slow
def test_two_real_libero_envs_feed_one_policy_through_two_tasks_and_a_rerun_resumes(tiny_checkpoint, tmp_path):
    """4 episodes (2 tasks x 2 init states) on 2 envs: each env's second episode is the other task, so its
    worker rebuilds its env and the batch takes that task's instruction. The virtual clock keeps a loaded
    2-core machine's pace out of it: each env waits for its action."""
    out = tmp_path / "eval"
    cmd = rtloop_eval("--tasks", "0,1", "--episodes", 2, "--envs", 2, "--clock", "virtual", "--max-steps", 6,
                      "--checkpoint", tiny_checkpoint, "--traces", "--out", out)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=EGL)
    assert proc.returncode == 0, proc.stderr
    rows = result_rows(out)
    assert sorted((r["task"], r["episode"]) for r in rows) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for r in rows:
        assert r["error"] is None and r["steps"] == 6 and r["sim"] == "libero" and "RANDOM WEIGHTS" in r["policy"]
        assert r["instruction"] == INSTRUCTIONS[r["task"]] and r["inferences"] >= 1
        trace = read_trace(out / "traces" / "eval" / f"task{r['task']}-ep{r['episode']}.jsonl")
        assert trace[0]["instruction"] == INSTRUCTIONS[r["task"]] and trace[0]["clock"] == "virtual"
        infs = [t for t in trace if t["kind"] == "inference"]
        assert len(infs) == r["inferences"] and len({t["env"] for t in trace if t["kind"] != "run"}) == 1
        # LIBERO, not a replay, in each worker (its own EGL context and renderer)
        assert all(t["render_s"] > 0 and t["physics_s"] > 0 for t in trace if t["kind"] == "tick")
        assert all(1 <= t["batch_size"] <= 2 for t in infs)
    doc = json.loads((out / "table.json").read_text())
    assert [t["task"] for t in doc["tasks"]] == [0, 1] and doc["total"]["episodes"] == 4
    assert doc["throughput"]["envs"] == 2 and "one batched policy" in doc["throughput"]["runner"]
    assert doc["throughput"]["episodes_per_hour_running"] > doc["throughput"]["episodes_per_hour"] > 0
    assert doc["gpu"] == {"sampled": False, "reason": "the policy runs on cpu"}
    assert "GPU utilisation: n/a (the policy runs on cpu)." in (out / "table.md").read_text()

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=EGL)
    assert again.returncode == 0, again.stderr
    assert f"resuming {out / 'results.jsonl'}: 4 of 4 episodes done" in again.stderr
    assert result_rows(out) == rows  # nothing run again


@pytest.mark.slow
def test_eval_on_a_local_ray_cluster(tiny_checkpoint, tmp_path):
    out = tmp_path / "eval"
    proc = subprocess.run(rtloop_eval("--backend", "ray", "--envs", 2, "--sim", "replay", "--tasks", "0,2",
                                      "--episodes", 1, "--max-steps", 10, "--checkpoint", tiny_checkpoint,
                                      "--out", out),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = result_rows(out)
    assert sorted(r["task"] for r in rows) == [0, 2]
    assert all(r["error"] is None and r["steps"] == 10 and r["policy"].endswith("[Ray actor]") for r in rows)
    assert all(r["instruction"] == INSTRUCTIONS[r["task"]] for r in rows)
    doc = json.loads((out / "table.json").read_text())
    assert doc["throughput"]["runner"] == "fleet: one batched policy, env workers as Ray actors"


def test_an_unreachable_ray_address_is_one_line_before_anything_starts(tmp_path):
    pytest.importorskip("ray")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    proc = subprocess.run(rtloop_eval("--backend", "ray", "--address", f"127.0.0.1:{port}", "--sim", "replay",
                                      "--out", tmp_path / "out"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and time.monotonic() - t0 < 30
    assert proc.stderr.count("\n") == 1 and f"--address 127.0.0.1:{port}: no Ray cluster answers there" in proc.stderr
    assert not (tmp_path / "out").exists()
