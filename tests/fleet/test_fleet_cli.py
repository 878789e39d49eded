"""`rtloop run --envs N` as a user runs it: a real CLI subprocess, env workers in real processes, the tiny
random-weight checkpoint, --sim replay (recorded LIBERO frames, no LIBERO needed), assertions on the trace.
Real LIBERO in two fleet workers (each its own EGL context and renderer): tests/eval/test_eval_fleet.py, on
the same backend and fleet (rtloop.fleet.command's make_backend, make_fleet)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rtloop.runtime.trace import read_trace


def rtloop(*args) -> list[str]:
    return [sys.executable, "-m", "rtloop", "run", "--metrics-port", "0", "--quiet", *map(str, args)]


def records(trace: Path, kind: str) -> list[dict]:
    return [r for r in read_trace(trace) if r["kind"] == kind]


@pytest.mark.slow
def test_a_fleet_of_three_envs_ticks_every_env_and_batches_their_frames(tiny_checkpoint, tmp_path):
    trace = tmp_path / "trace.jsonl"
    proc = subprocess.run(rtloop("--envs", 3, "--oversubscribe", "--sim", "replay", "--rate", 20, "--max-steps", 40,
                                 "--checkpoint", tiny_checkpoint, "--trace", trace),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    ticks, infs, episodes = records(trace, "tick"), records(trace, "inference"), records(trace, "episode")
    assert sorted((e["env"], e["episode"], e["steps"], e["error"]) for e in episodes) == [
        (0, 0, 40, None), (1, 1, 40, None), (2, 2, 40, None)]
    for env in range(3):  # every env ticked its whole episode on its own clock
        mine = [t for t in ticks if t["env"] == env]
        assert [t["step"] for t in mine] == list(range(40))
        assert {t["action_source"] for t in mine[1:]} & {"fresh", "held"}
    assert {r["env"] for r in infs} == {0, 1, 2}
    assert max(r["batch_size"] for r in infs) > 1  # frames of several envs went into one policy call
    header = read_trace(trace)[0]
    assert header["envs"] == 3 and "RANDOM WEIGHTS" in header["policy"]
    assert "fleet of 3 envs" in proc.stdout and "env 2:" in proc.stdout
    warm = [line.split(" ready")[0] for line in proc.stderr.splitlines() if line.startswith("rtloop: warm-up:")]
    assert warm == ["rtloop: warm-up: batch 1", "rtloop: warm-up: batch 2", "rtloop: warm-up: batch 4"]


@pytest.mark.slow
def test_a_fleet_on_the_virtual_clock_waits_for_each_action(tiny_checkpoint, tmp_path):
    """Each env waits for its action and its runtime charges the latency model on its own clock: with a
    fixed 100 ms at 20 Hz every env runs the same ticks, however loaded the machine."""
    trace = tmp_path / "trace.jsonl"
    proc = subprocess.run(rtloop("--envs", 2, "--sim", "replay", "--clock", "virtual", "--inject-delay", 0.1,
                                 "--max-steps", 20, "--checkpoint", tiny_checkpoint, "--trace", trace),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    ticks, infs = records(trace, "tick"), records(trace, "inference")
    assert read_trace(trace)[0]["clock"] == "virtual"
    for env in (0, 1):
        mine = [t for t in ticks if t["env"] == env]
        assert [t["t_start"] for t in mine] == pytest.approx([k * 0.05 for k in range(20)])
        # an inference every 100 ms, each action applied fresh on arrival and held for one tick
        assert [t["action_source"] for t in mine] == ["dummy"] * 2 + ["fresh", "held"] * 9
        assert all(r["t_end"] - r["t_start"] == pytest.approx(0.1) for r in infs if r["env"] == env)


def env_worker_pids(parent: int) -> list[int]:
    """The run's env worker processes (spawned children running spawn_main), oldest first."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    pids = [int(c) for c in children
            if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes() and b"resource_tracker" not in
            Path(f"/proc/{c}/cmdline").read_bytes()]
    return sorted(pids)


@pytest.mark.slow
def test_a_killed_env_worker_ends_only_its_episode(tiny_checkpoint, tmp_path):
    trace = tmp_path / "trace.jsonl"
    run = subprocess.Popen(rtloop("--envs", 2, "--sim", "replay", "--rate", 20, "--max-steps", 80,
                                  "--checkpoint", tiny_checkpoint, "--trace", trace),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (trace.exists() and trace.read_text().strip()):  # the header: the envs are ticking
            assert run.poll() is None and time.monotonic() < deadline, run.communicate()
            time.sleep(0.2)
        time.sleep(1.0)
        pids = env_worker_pids(run.pid)
        assert len(pids) == 2, pids
        os.kill(pids[1], signal.SIGKILL)  # env 1's worker
        out, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 1, err  # an episode ended on an error; the run still finished
    episodes = {e["env"]: e for e in records(trace, "episode")}
    assert episodes[0]["steps"] == 80 and episodes[0]["error"] is None  # env 0 never noticed
    assert episodes[1]["error"].startswith("worker: env 1") and "signal 9" in episodes[1]["error"]
    assert 0 < episodes[1]["steps"] < 80
    assert [t["step"] for t in records(trace, "tick") if t["env"] == 0] == list(range(80))
    assert any(r["kind"] == "error" and r["error_kind"] == "worker" for r in read_trace(trace))


def test_more_envs_than_cores_is_refused_in_one_line_before_anything_starts(tmp_path):
    proc = subprocess.run(rtloop("--envs", 10_000, "--sim", "replay", "--trace", tmp_path / "t.jsonl"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--envs 10000 is more than this machine's" in proc.stderr
    assert "--oversubscribe" in proc.stderr and not (tmp_path / "t.jsonl").exists()
