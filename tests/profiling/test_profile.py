"""rtloop profile: py-spy's output, the flame graph drawn from it, the torch trace, the report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from rtloop.policy.base import STAGES
from rtloop.profiling import pyspy
from rtloop.profiling.flamegraph import collapse, render_svg
from rtloop.profiling.report import NATIVE_CAVEAT, build_report, format_report, stage_shares

SPEEDSCOPE_KEYS = {"$schema", "profiles", "shared"}

BUSY_CHILD = textwrap.dedent("""
    import threading, time
    def spin(seconds):
        t = time.perf_counter()
        while time.perf_counter() - t < seconds:
            sum(range(1000))
    worker = threading.Thread(target=spin, args=(0.6,), name="rtloop-policy_0")
    worker.start()
    spin(0.3)
    worker.join()
""")


def check_speedscope(doc: dict) -> None:
    assert SPEEDSCOPE_KEYS <= doc.keys()
    assert doc["shared"]["frames"] and all("name" in f for f in doc["shared"]["frames"])
    for p in doc["profiles"]:
        assert p["type"] == "sampled" and len(p["samples"]) == len(p["weights"])


def test_py_spy_speedscope_and_flamegraph(tmp_path):
    """A real py-spy recording of a real two-thread process, with the flags rtloop profile uses."""
    out = tmp_path / "speedscope.json"
    target = [sys.executable, "-c", BUSY_CHILD]
    cmd = pyspy.record_command(pyspy.find_py_spy(), str(out), 100, native=False, idle=False, target=target)
    result = pyspy.record(cmd, str(out), str(tmp_path / "log.txt"))
    if not result.ok:
        assert result.message == pyspy.PTRACE_HINT, result.stderr_tail
        pytest.skip(f"py-spy cannot attach here: {result.message}")
    doc = json.loads(out.read_text())
    check_speedscope(doc)
    assert any('"rtloop-policy_0"' in p["name"] for p in doc["profiles"])
    svg = render_svg(collapse(doc), "test")
    root = ET.fromstring(svg)  # well-formed XML
    titles = [t.text for t in root.iter("{http://www.w3.org/2000/svg}title")]
    assert any("spin" in t for t in titles)
    assert any("rtloop-policy_0" in t for t in titles)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv to drop CAP_SYS_PTRACE")
def test_ptrace_denied_is_one_line(tmp_path):
    """Without CAP_SYS_PTRACE, py-spy cannot read a non-dumpable process: the real failure, one line."""
    child = subprocess.Popen([sys.executable, "-c", "import ctypes, time; ctypes.CDLL(None).prctl(4, 0, 0, 0, 0); time.sleep(30)"])
    try:
        out = tmp_path / "speedscope.json"
        cmd = ["setpriv", "--bounding-set=-sys_ptrace", "--inh-caps=-sys_ptrace", "--",
               pyspy.find_py_spy(), "record", "--format", "speedscope", "--output", str(out), "--pid", str(child.pid)]
        result = pyspy.record(cmd, str(out), str(tmp_path / "log.txt"))
    finally:
        child.kill()
        child.wait()
    assert not result.ok
    assert result.message == pyspy.PTRACE_HINT
    assert "\n" not in result.message


def test_torch_trace_entry_point(tmp_path):
    """The entry point the GPU machine runs (there with --size 7b --device cuda), here on CPU with tiny."""
    proc = subprocess.run(
        [sys.executable, "-m", "rtloop.profiling.torch_trace", "--size", "tiny", "--calls", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    events = json.loads((tmp_path / "torch_trace.json").read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert set(STAGES) <= names
    summary = json.loads((tmp_path / "torch_summary.json").read_text())
    assert summary["stages_in_trace"] == list(STAGES)
    stages = summary["stages"]
    # processor is two ranges per act call (the LIBERO image path, then predict_action's inputs), summed per call
    assert stages["processor"]["ranges_per_call"] == 2
    assert stages["generate"]["ranges_per_call"] == stages["detokenize"]["ranges_per_call"] == 1
    assert all(len(stages[s]["ms_per_call"]) == 2 and min(stages[s]["ms_per_call"]) > 0 for s in STAGES)


def test_stage_shares_add_up_per_lane():
    """Each lane accounts for the whole loop wall time: stages plus what is left (idle)."""
    ticks = [dict(kind="tick", episode=0, t_start=t, t_end=t + 0.03, step_s=0.03, physics_s=0.01, render_s=0.015)
             for t in (0.0, 0.05, 0.10)]
    infs = [dict(kind="inference", episode=0, t_start=0.01, t_end=0.09, queue_wait_s=0.01,
                 stages={"processor": 0.01, "generate": 0.06, "detokenize": 0.005})]
    shares = stage_shares(ticks + infs)
    assert shares["wall_s"] == pytest.approx(0.13)
    for lane in ("sim", "inference"):
        assert sum(v["fraction"] for v in shares[lane].values()) == pytest.approx(1.0)
    assert shares["sim"]["idle"]["s"] == pytest.approx(0.13 - 0.09)
    assert shares["inference"]["hand-off"]["s"] == pytest.approx(0.08 - 0.075)
    assert shares["inference"]["rest"]["s"] == pytest.approx(0.13 - 0.08 - 0.01)


@pytest.mark.parametrize("native", [False, True])
def test_native_marks_thread_numbers_unreliable(native):
    """Under --native py-spy's idle check misses waits, so the thread shares and the one-core ceiling are
    flagged, not stated; the stage lanes (from the trace) are printed either way."""
    ticks = [dict(kind="tick", episode=0, t_start=t, t_end=t + 0.03, step_s=0.03, physics_s=0.01, render_s=0.015)
             for t in (0.0, 0.05, 0.10)]
    infs = [dict(kind="inference", episode=0, t_start=0.01, t_end=0.09, queue_wait_s=0.01,
                 stages={"processor": 0.01, "generate": 0.06, "detokenize": 0.005})]
    frames = [{"name": "_WorkItem.run", "file": "/py/concurrent/futures/thread.py"},
              {"name": "LiberoEnv.step", "file": "rtloop/sim/libero_env.py"}]
    speedscope = {"shared": {"frames": frames},
                  "profiles": [{"name": 'Thread 2 "rtloop-sim_0"', "samples": [[0, 1]], "weights": [0.05]}]}
    sampling = {"flags": "--rate 100", "samples": 1, "errors": 0, "max_behind_s": 0.0, "native": native}
    report = build_report(ticks + infs, speedscope, list(STAGES), sampling=sampling)
    text = format_report(report, "t")
    assert report["threads_caveat"] == (NATIVE_CAVEAT if native else "")
    assert (NATIVE_CAVEAT in text) == native
    assert ("leaving" in text) != native  # the one-core ceiling is stated only without --native
    assert "| generate |" in text and "| render |" in text


def test_bad_option_is_one_line():
    proc = subprocess.run([sys.executable, "-m", "rtloop", "profile", "--rate-hz", "0"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "rtloop: error: --rate-hz must be >= 1 (got 0)"


@pytest.mark.slow
def test_rtloop_profile_libero(tmp_path):
    """A real `rtloop profile` of a short LIBERO run with the tiny checkpoint: every file well-formed, the
    stage names in the torch trace and the report. If py-spy cannot attach here, the one-line reason must
    be printed and the torch profile and the report must still be there."""
    out = tmp_path / "prof"
    proc = subprocess.run(
        [sys.executable, "-m", "rtloop", "profile", "--max-steps", "4", "--quiet", "--metrics-port", "0",
         "--torch-calls", "2", "--rate-hz", "50", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    if report["pyspy"] == "ok":
        check_speedscope(json.loads((out / "speedscope.json").read_text()))
        ET.parse(out / "flamegraph.svg")
        assert {"rtloop-sim", "rtloop-policy", "main (event loop)"} <= report["threads"].keys()
    else:
        assert report["pyspy"] == pyspy.PTRACE_HINT
        assert f"rtloop profile: {pyspy.PTRACE_HINT}" in proc.stderr
    assert (out / "trace.jsonl").exists() and (out / "summary.json").exists()
    events = json.loads((out / "torch_trace.json").read_text())["traceEvents"]
    assert set(STAGES) <= {e.get("name") for e in events}
    assert set(STAGES) <= report["stages"]["inference"].keys()
    assert report["torch_trace_stages"] == list(STAGES)
    md = (out / "report.md").read_text()
    assert all(f"| {s} |" in md for s in STAGES)
    assert report["ceiling"]["ceiling_hz"] > 0


def test_run_argv_passes_a_switched_off_centre_crop():
    """--center-crop is on by default; the profiled run must get --no-center-crop, not a stray 'False'."""
    from rtloop.cli import build_parser
    from rtloop.commands.profile import run_argv

    args = build_parser("profile").parse_args(["profile", "--no-center-crop", "--rate", "5"])
    assert run_argv(args, args._run_actions) == ["--rate", "5.0", "--no-center-crop"]
    args = build_parser("profile").parse_args(["profile"])
    assert run_argv(args, args._run_actions) == []
