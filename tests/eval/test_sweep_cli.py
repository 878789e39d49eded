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
from rtloop.runtime.timeline import TRACKS

pytestmark = pytest.mark.slow

STEPS = 8  # 0.4 s at 20 Hz: a 100 ms delay still holds actions and drops frames
GRID = ["--latency", "0,0.1", "--mode", "async,sync", "--tasks", "0", "--episodes", "2"]


def sweep_cmd(tiny_checkpoint, out, *grid):
    return [sys.executable, "-m", "rtloop", *sweep_args(tiny_checkpoint, out, *grid)]


def sweep_args(tiny_checkpoint, out, *grid):
    return ["sweep", *grid, "--sim", "replay", "--max-steps", str(STEPS),
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
        assert r["steps"] == STEPS and r["ticks"] == STEPS and "RANDOM WEIGHTS" in r["policy"] and "replay" in r["sim"]

    doc = json.loads((out / "table.json").read_text())
    cells = {c["cell"]: c for c in doc["cells"]}
    assert list(cells) == ["async 0ms", "async 100ms", "sync 0ms", "sync 100ms"]
    assert all(c["episodes"] == 2 and c["ci95"] is not None for c in cells.values())
    assert cells["sync 100ms"]["fresh_fraction"] == 1.0  # the sim waits: every action is new
    # async with a 100 ms delay at 20 Hz holds actions and ages them past the delay
    assert cells["async 100ms"]["fresh_fraction"] < 0.6 and cells["async 100ms"]["action_age_p50_s"] > 0.1
    assert "| async | 100 ms | 2 |" in (out / "table.md").read_text()
    assert (out / "success_vs_latency.png").read_bytes()[:4] == b"\x89PNG"

    timeline_of_a_held_action_cell(out / "traces" / "async_100ms" / "task0-ep0.jsonl", tmp_path / "tl")


def test_a_results_file_of_another_grid_is_refused(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "sweep"
    out.mkdir()
    grid = {"cells": {"async 0ms": {"mode": "async", "latency_s": 0.0, "run": {"rate": 20.0}}}}
    (out / "results.jsonl").write_text(json.dumps({"kind": "grid", "grid": grid}) + "\n")
    assert rtloop_main(sweep_args(tiny_checkpoint, out, "--latency", "0", "--mode", "async")) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("rtloop: error: ") and "belongs to a different grid" in errors[0]


def timeline_of_a_held_action_cell(trace, prefix):
    assert rtloop_main(["timeline", str(trace), "--start", "0", "--end", "1", "--out", str(prefix)]) == 0
    assert prefix.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    events = json.loads(prefix.with_suffix(".json").read_text())["traceEvents"]
    names = {e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert names == {"frames", "inference", "sim ticks"}
    slices = [e for e in events if e["ph"] == "X"]
    track = {name: [e for e in slices if e["tid"] == tid] for name, tid in TRACKS.items()}
    tick_names = Counter(e["name"] for e in track["sim ticks"])
    assert tick_names["fresh"] >= 1 and tick_names["held"] >= 1 and tick_names["env.step"] == STEPS
    assert {e["name"] for e in track["inference"]} >= {"processor", "generate", "detokenize", "injected_delay"}
    assert any(e["name"].endswith("(dropped)") for e in track["frames"])  # 100 ms is longer than a tick
    assert sum(e["ph"] == "i" for e in events) == len(track["frames"])  # a capture instant per frame
    slice_starts = {(e["tid"], e["ts"]) for e in slices}
    assert all((e["tid"], e["ts"]) in slice_starts for e in events if e["ph"] in "sf")  # flows sit on slices
    starts = Counter(e["id"] for e in events if e["ph"] == "s")
    ends = Counter(e["id"] for e in events if e["ph"] == "f")
    assert starts == ends and any(i.startswith("frame") for i in starts) and any(i.startswith("action") for i in starts)
    ages = [e["args"]["age"] for e in events if e["ph"] == "C"]
    assert ages and min(ages) > 100  # every applied action is older than the injected delay


def test_eval_writes_a_per_task_table_with_throughput(tiny_checkpoint, tmp_path):
    out = tmp_path / "eval"
    proc = subprocess.run([sys.executable, "-m", "rtloop", "eval", "--sim", "replay", "--tasks", "0,2", "--episodes", "2",
                           "--max-steps", "5", "--envs", "1", "--checkpoint", str(tiny_checkpoint), "--out", str(out)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((out / "table.json").read_text())
    assert [t["task"] for t in doc["tasks"]] == [0, 2] and all(t["episodes"] == 2 for t in doc["tasks"])
    assert doc["tasks"][0]["instruction"] == "pick up the alphabet soup and place it in the basket"
    assert doc["total"]["episodes"] == 4 and doc["throughput"]["episodes"] == 4
    assert doc["throughput"]["episodes_per_hour"] > 0
    assert "episodes per hour" in (out / "table.md").read_text()
    assert "interrupted" not in (out / "table.md").read_text()  # that note is for a run cut short


@pytest.mark.parametrize("argv, message", [
    (["eval", "--backend", "ray", "--policy", "expert"], "--backend ray runs one batched policy for all envs"),
    (["eval", "--address", "127.0.0.1:6379"], "--address is for --backend ray"),
    (["eval", "--envs", "4096"], "more than this machine's"),
    (["eval", "--episodes", "51"], "--episodes must be 1..50"),
    (["sweep", "--latency", "0.1,-0.05"], "must be >= 0 (got -0.05)"),
    (["sweep", "--mode", "async,later"], "unknown mode 'later'"),
    (["sweep", "--latency-scale", "2"], "--latency-scale projects the --latency-profile latencies"),
    (["sweep", "--latency-profile", "README.md"], "latency profile README.md: not JSON"),
    (["timeline", "no/such/trace.jsonl"], "no such trace file"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, tmp_path, capsys):
    out = [] if argv[0] == "timeline" else ["--out", str(tmp_path / "out")]
    assert rtloop_main([*argv, *out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rtloop: error: ") and message in err[0]
    assert not (tmp_path / "out").exists()
