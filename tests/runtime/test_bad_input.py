"""`rtloop run` with bad input, as a user types it: a real CLI process that must answer with one line
(`rtloop: error: ...`) and exit 2 before anything heavy starts (no env, no model: each case takes seconds)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest


def rtloop_run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "rtloop", "run", "--sim", "replay", *args]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=cwd, env=env)


CASES = [
    (["--rate", "0"], "--rate must be a finite number > 0"),
    (["--rate", "inf"], "--rate must be a finite number > 0 (got inf)"),
    (["--rate", "nan"], "--rate must be a finite number > 0 (got nan)"),
    (["--rate", "fast"], "argument --rate: invalid float value: 'fast'"),
    (["--episodes", "51"], "a task has 50 init states"),
    (["--episode-start", "49", "--episodes", "2"], "a task has 50 init states"),
    (["--episode-start", "-1"], "a task has 50 init states"),
    (["--seed", "-1"], "--seed must be 0..4294967295"),
    (["--seed", str(2**32)], "--seed must be 0..4294967295"),
    (["--max-action-age", "0"], "--max-action-age must be a finite number > 0"),
    (["--inject-delay", "-0.5"], "--inject-delay must be a finite number of seconds >= 0"),
    (["--device", "foo"], "--device 'foo': expected auto, cpu, cuda or cuda:N"),
    (["--policy", "bogus"], "--policy 'bogus': expected openvla, expert, ws://HOST:PORT"),
    (["--policy", "ws://localhost"], "a remote policy is ws://HOST:PORT"),
    (["--policy", "expert", "--suite", "libero_goal"], "solves libero_object only"),
    (["--policy-proc"], "unrecognized arguments: --policy-proc"),  # no abbreviations
    (["--trace", "/proc/rtloop/trace.jsonl"], "--trace /proc/rtloop/trace.jsonl: cannot write"),
    (["--video", "/proc/rtloop/ep.mp4"], "--video /proc/rtloop/ep.mp4: cannot write"),
    (["--video", "ep.webm"], "unsupported format"),
    (["--metrics-port", "70000"], "--metrics-port must be 0..65535"),
    (["--replay", "/nonexistent.npz"], "--replay /nonexistent.npz: no such file"),
    (["--chunk-merge", "newest"], "--chunk-merge: unknown chunk merge rule 'newest'; valid: latest_only, weighted_average"),
    (["--chunk-threshold", "1.5"], "--chunk-threshold must be in 0..1 (got 1.5)"),
    (["--chunk-threshold", "nan"], "--chunk-threshold must be in 0..1 (got nan)"),
]


@pytest.mark.parametrize("args, message", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
    proc = rtloop_run("--metrics-port", "0", *args, cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("rtloop: error: ") and message in lines[0], lines[0]
    assert not (tmp_path / "runs").exists()  # nothing was started


def test_cuda_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = rtloop_run("--metrics-port", "0", "--device", "cuda")
    assert proc.returncode == 2 and proc.stderr.strip() == "rtloop: error: --device cuda: CUDA is not available on this machine"


def test_a_metrics_port_in_use_is_found_before_loading():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = rtloop_run("--metrics-port", str(port))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert f"cannot serve metrics on 127.0.0.1:{port}: Address already in use" in lines[0]
