"""`rtloop sweep` and `rtloop timeline` end to end, as a user runs them: real CLI subprocesses, spawn workers,
the tiny random-weight checkpoint, the replay sim (recorded LIBERO frames, actions ignored: no outcome,
but the real runtime, mailbox and records)."""

import json
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from rtloop.cli import main as rtloop_main

pytestmark = pytest.mark.slow

GRID = ["--latency", "0,0.1", "--mode", "async,sync", "--tasks", "0", "--episodes", "2"]


def sweep_cmd(tiny_checkpoint, out, *grid):
    return [sys.executable, "-m", "rtloop", "sweep", *grid, "--sim", "replay", "--max-steps", "16",
            "--checkpoint", str(tiny_checkpoint), "--workers", "1", "--traces", "--out", str(out)]


def result_rows(out):
    lines = (out / "results.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["kind"] == "grid"
    return [json.loads(line) for line in lines[1:]]


def test_sweep_is_interrupted_resumes_and_writes_its_table_and_plot(tiny_checkpoint, tmp_path):
    out = tmp_path / "sweep"
    proc = subprocess.Popen(sweep_cmd(tiny_checkpoint, out, *GRID), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ((out / "results.jsonl").exists() and len((out / "results.jsonl").read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "the same command resumes" in stderr
    before = result_rows(out)
    assert 1 <= len(before) < 8 and not any(r["error"] for r in before)
    assert (out / "table.md").exists()  # written from what was done

    again = subprocess.run(sweep_cmd(tiny_checkpoint, out, *GRID), capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stderr
    assert f"resuming {out / 'results.jsonl'}: {len(before)} of 8 episodes done" in again.stderr
    rows = result_rows(out)
    assert rows[: len(before)] == before  # nothing rewritten
    keys = Counter((r["cell"], r["task"], r["episode"]) for r in rows)
    assert len(keys) == 8 and set(keys.values()) == {1}  # nothing run twice
    for r in rows:
        assert r["steps"] == 16 and r["ticks"] == 16 and "RANDOM WEIGHTS" in r["policy"] and "replay" in r["sim"]

    doc = json.loads((out / "table.json").read_text())
    cells = {c["cell"]: c for c in doc["cells"]}
    assert list(cells) == ["async 0ms", "async 100ms", "sync 0ms", "sync 100ms"]
    assert all(c["episodes"] == 2 and c["ci95"] is not None for c in cells.values())
    assert cells["sync 100ms"]["fresh_fraction"] == 1.0  # the sim waits: every action is new
    # async with a 100 ms delay at 20 Hz holds actions and ages them past the delay
    assert cells["async 100ms"]["fresh_fraction"] < 0.6 and cells["async 100ms"]["action_age_p50_s"] > 0.1
    assert "| async | 100 ms | 2 |" in (out / "table.md").read_text()
    assert (out / "success_vs_latency.png").read_bytes()[:4] == b"\x89PNG"

    refused = subprocess.run(sweep_cmd(tiny_checkpoint, out, "--latency", "0,0.2", "--episodes", "2"),
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    errors = [line for line in refused.stderr.splitlines() if line.startswith("rtloop: error")]
    assert len(errors) == 1 and "belongs to a different grid" in errors[0]

    timeline_of_a_held_action_cell(out / "traces" / "async_100ms" / "task0-ep0.jsonl", tmp_path / "tl")


def timeline_of_a_held_action_cell(trace, prefix):
    assert rtloop_main(["timeline", str(trace), "--start", "0", "--end", "0.6", "--out", str(prefix)]) == 0
    assert prefix.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    events = json.loads(prefix.with_suffix(".json").read_text())["traceEvents"]
    names = {e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert names == {"frames", "inference", "sim ticks"}
    slices = [e for e in events if e["ph"] == "X"]
    tick_names = Counter(e["name"] for e in slices if e["cat"] == "tick")
    assert tick_names["fresh"] >= 1 and tick_names["held"] >= 1 and tick_names["env.step"] >= 10
    assert {e["name"] for e in slices if e["cat"] == "stage"} >= {"processor", "generate", "detokenize", "injected_delay"}
    assert any(e["name"].endswith("(dropped)") for e in slices if e["cat"] == "mailbox")  # 100 ms > one tick
    assert sum(e["ph"] == "i" for e in events) == sum(e["cat"] == "mailbox" for e in slices)
    starts = Counter(e["id"] for e in events if e["ph"] == "s")
    ends = Counter(e["id"] for e in events if e["ph"] == "f")
    assert starts == ends and any(i.startswith("frame") for i in starts) and any(i.startswith("action") for i in starts)
    ages = [e["args"]["age"] for e in events if e["ph"] == "C"]
    assert ages and min(ages) > 100  # every applied action is older than the injected delay
