"""Latency models (rtloop/runtime/latency.py) and the wall-clock wrapper that applies them (SlowPolicy):
sampling, labels, the three file kinds, the committed H200 profiles, and every bad input as one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from rtloop.errors import InputError
from rtloop.policy.base import PolicyOutput
from rtloop.runtime import slow
from rtloop.runtime.latency import (PROFILE_FORMAT, EmpiricalLatency, FixedLatency, MeasuredLatency, Samples,
                                    ScaledLatency, latency_model_from_args, load_samples, profile_document)

ROOT = Path(__file__).resolve().parents[2]
PROFILES = ROOT / "profiles"
H200_TRACE = {e: PROFILES / f"20261201T0344Z-h200-replay-{e}" / "trace.jsonl" for e in ("compiled", "reference")}

RECORDED = (0.030, 0.040, 0.050, 0.060)


def samples(seconds=RECORDED) -> Samples:
    return Samples(tuple(seconds), "compiled", "NVIDIA H200", "test seconds", "a test", "test.json")


def write_trace(path: Path, seconds, engine="compiled") -> Path:
    header = {"kind": "run", "engine": engine, "rate": 20.0, "sync": False, "policy": "p", "sim": "s",
              "machine": {"host": "vm", "cpu_count": 16, "device": "cuda", "gpu": "NVIDIA H200"}}
    lines = [header]
    for i, s in enumerate(seconds):
        lines.append({"kind": "tick", "episode": 0, "step": i, "t_start": 1.0 + i, "t_end": 1.5 + i})
        lines.append({"kind": "inference", "episode": 0, "seq": i + 1, "t_start": 10.0 + i, "t_end": 10.0 + i + s,
                      "stages": {"generate": s / 2}})
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def write_bench(path: Path, engines: dict) -> Path:
    """engines: name -> (libero_image seconds, predict_action seconds), or None for a percentiles-only engine."""
    report = {"device": "NVIDIA H200", "checkpoint": "random weights, 7b", "dtype": "bfloat16", "engines": {}}
    for name, raw in engines.items():
        result = {"predict_action": {"p50_ms": 29.0, "p95_ms": 29.5, "p99_ms": 29.7}}
        if raw is not None:
            result["libero_image_samples_s"], result["predict_action_samples_s"] = raw
        report["engines"][name] = result
    path.write_text(json.dumps(report))
    return path


def write_json(path: Path, doc) -> Path:
    path.write_text(json.dumps(doc))
    return path


# --- sampling ----------------------------------------------------------------------------------------------

def test_fixed_and_measured():
    fixed = FixedLatency(0.1)
    assert fixed.label == "fixed 100 ms" and FixedLatency(0.0).label == "fixed 0 ms"
    assert [fixed.sample(i, measured_s=0.5) for i in range(3)] == [0.1, 0.1, 0.1]
    assert fixed.describe() == {"kind": "fixed", "label": "fixed 100 ms", "seconds": 0.1}
    measured = MeasuredLatency()
    assert measured.sample(7, measured_s=0.033) == 0.033
    assert measured.describe()["kind"] == "measured" and "measured" in measured.label
    with pytest.raises(ValueError, match="needs measured_s"):
        measured.sample(0)


def test_iid_sampling_depends_only_on_seed_and_index():
    a, b = EmpiricalLatency(samples(), "iid", seed=3), EmpiricalLatency(samples(), "iid", seed=3)
    forward = [a.sample(i) for i in range(200)]
    backward = [b.sample(i) for i in reversed(range(200))][::-1]
    assert forward == backward  # any index, in any order, gives the same draw
    assert set(forward) == set(RECORDED)  # draws are recorded values, every one of them reached
    other = [EmpiricalLatency(samples(), "iid", seed=4).sample(i) for i in range(200)]
    assert other != forward
    assert a.describe()["order"] == "iid" and a.describe()["seed"] == 3


def test_recorded_order_cycles():
    model = EmpiricalLatency(samples(), "recorded", seed=99)
    assert [model.sample(i) for i in range(6)] == [*RECORDED, RECORDED[0], RECORDED[1]]
    assert model.label == "empirical: compiled on NVIDIA H200 (test.json, 4 samples, recorded order)"
    assert model.describe()["seed"] is None  # the seed plays no part


def test_empirical_label_and_description():
    model = EmpiricalLatency(samples(), "iid", seed=0)
    assert model.label == "empirical: compiled on NVIDIA H200 (test.json, 4 samples)"
    d = model.describe()
    assert (d["kind"], d["samples"], d["engine"], d["machine"]) == ("empirical", 4, "compiled", "NVIDIA H200")
    assert d["p50_s"] == pytest.approx(0.045)
    json.dumps(d)  # goes into the trace header as is


def test_scale_is_a_labelled_projection():
    base = EmpiricalLatency(samples(), "recorded")
    scaled = ScaledLatency(base, 2.0)
    assert scaled.label == base.label + " x2.0 (PROJECTION)"
    assert [scaled.sample(i) for i in range(4)] == [2 * s for s in RECORDED]
    assert scaled.describe()["kind"] == "projection" and scaled.describe()["of"] == base.describe()
    measured = latency_model_from_args(None, None, 1.5, seed=0)
    assert measured.label == "measured: the policy's own call time x1.5 (PROJECTION)"
    assert measured.sample(0, measured_s=0.02) == pytest.approx(0.03)


def test_options_pick_the_model(tmp_path):
    profile = write_json(tmp_path / "p.json", profile_document(samples()))
    assert isinstance(latency_model_from_args(None, None, None, seed=0), MeasuredLatency)
    assert latency_model_from_args(0.0, None, None, seed=0) == FixedLatency(0.0)  # L = 0 is a model, not "none"
    assert latency_model_from_args(0.25, None, None, seed=0).label == "fixed 250 ms"
    model = latency_model_from_args(None, str(profile), None, seed=5, order="recorded")
    assert isinstance(model, EmpiricalLatency) and model.order == "recorded" and model.sample(1) == RECORDED[1]
    assert isinstance(latency_model_from_args(None, str(profile), 1.0, seed=0), EmpiricalLatency)  # x1: as measured
    assert isinstance(latency_model_from_args(None, str(profile), 3.0, seed=0), ScaledLatency)


# --- files -------------------------------------------------------------------------------------------------

def test_trace_jsonl(tmp_path):
    trace = write_trace(tmp_path / "trace.jsonl", [0.03, 0.25, 0.125])
    for spec in (str(trace), f"{trace}:compiled"):
        got = load_samples(spec)
        assert got.seconds == pytest.approx((0.03, 0.25, 0.125), abs=1e-12)  # t_end - t_start, in order
        assert (got.engine, got.machine, got.source) == ("compiled", "NVIDIA H200", str(trace))
    with pytest.raises(InputError, match="a trace of engine compiled, not reference"):
        load_samples(f"{trace}:reference")


def test_bench_json(tmp_path):
    bench = write_bench(tmp_path / "bench.json", {"reference": None, "compiled": ([0.003, 0.004], [0.029, 0.030]),
                                                  "compiled+fp8": ([0.003, 0.003], [0.024, 0.025])})
    got = load_samples(f"{bench}:compiled+fp8")
    assert got.seconds == pytest.approx((0.027, 0.028))  # libero_image + predict_action, per call
    assert (got.engine, got.machine) == ("compiled+fp8", "NVIDIA H200") and "predict_action" in got.quantity
    with pytest.raises(InputError, match=r"several engines: name one, .*bench.json:ENGINE \(with samples: compiled, "
                                         r"compiled\+fp8\)"):
        load_samples(str(bench))
    with pytest.raises(InputError, match="no samples for engine 'reference'"):
        load_samples(f"{bench}:reference")  # percentiles only
    single = write_bench(tmp_path / "one.json", {"eager": ([0.1], [0.2])})
    assert load_samples(str(single)).engine == "eager"  # one engine with samples: no need to name it


def test_profile_json_round_trips_a_trace(tmp_path):
    trace = write_trace(tmp_path / "trace.jsonl", [0.03, 0.04])
    from_trace = load_samples(str(trace))
    profile = write_json(tmp_path / "h.json", profile_document(from_trace, notes="made in a test"))
    doc = json.loads(profile.read_text())
    assert doc["format"] == PROFILE_FORMAT and doc["notes"] == "made in a test"
    got = load_samples(f"{profile}:compiled")
    assert got.seconds == from_trace.seconds and got.path == str(profile) and got.source == str(trace)
    with pytest.raises(InputError, match="a profile of engine compiled, not eager"):
        load_samples(f"{profile}:eager")


def test_a_file_name_with_a_colon_is_a_file(tmp_path):
    odd = write_json(tmp_path / "h200:x.json", profile_document(samples()))
    assert load_samples(str(odd)).engine == "compiled"


def test_committed_h200_profiles_are_the_replay_traces():
    for engine, count in (("compiled", 241), ("reference", 55)):
        profile = PROFILES / "latency" / f"h200-{engine}.json"
        got, trace = load_samples(str(profile)), load_samples(str(H200_TRACE[engine]))
        assert got.seconds == trace.seconds and len(got.seconds) == count
        assert (got.engine, got.machine) == (engine, "NVIDIA H200")
        assert got.source == f"profiles/20261201T0344Z-h200-replay-{engine}/trace.jsonl"
        assert "RANDOM WEIGHTS" in got.notes  # latency does not depend on weight values; still said
    compiled = EmpiricalLatency(load_samples(str(PROFILES / "latency" / "h200-compiled.json")))
    assert compiled.label.startswith("empirical: compiled on NVIDIA H200 (") and "241 samples)" in compiled.label
    # the closed-loop p50s of profiles/README.md: compiled ~36 ms, reference ~223 ms
    assert compiled.describe()["p50_s"] == pytest.approx(0.0360, abs=5e-4)
    reference = EmpiricalLatency(load_samples(str(PROFILES / "latency" / "h200-reference.json")))
    assert reference.describe()["p50_s"] == pytest.approx(0.2226, abs=5e-4)


def test_the_committed_bench_holds_percentiles_only():
    with pytest.raises(InputError, match="bench-h200-7b.json: a bench report with no raw per-call samples"):
        load_samples(str(PROFILES / "bench-h200-7b.json:compiled+fp8"))


# --- bad input ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("delay", [-0.1, math.nan, math.inf])
def test_bad_delay(delay):
    with pytest.raises(InputError, match="--inject-delay must be a finite number of seconds >= 0"):
        latency_model_from_args(delay, None, None, seed=0)


@pytest.mark.parametrize("scale", [0.0, -2.0, math.nan, math.inf])
def test_bad_scale(scale):
    with pytest.raises(InputError, match="--latency-scale must be a finite number > 0"):
        latency_model_from_args(None, None, scale, seed=0)


def test_options_that_do_not_go_together(tmp_path):
    profile = write_json(tmp_path / "p.json", profile_document(samples()))
    with pytest.raises(InputError, match="--inject-delay and --latency-profile are two latency models: give one"):
        latency_model_from_args(0.1, str(profile), None, seed=0)
    with pytest.raises(InputError, match="--latency-scale projects a measured or recorded latency"):
        latency_model_from_args(0.1, None, 2.0, seed=0)
    with pytest.raises(InputError, match="--seed must be >= 0 to draw latencies"):
        latency_model_from_args(None, str(profile), None, seed=-1)


def _bad_files(tmp_path: Path) -> list[tuple[str, str]]:
    (tmp_path / "a_directory").mkdir()
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00junk")
    good = profile_document(samples())
    return [
        (str(tmp_path / "missing.json"), "cannot read it (No such file or directory)"),
        (str(tmp_path / "a_directory"), "cannot read it (Is a directory)"),
        (str(tmp_path / "binary.json"), "cannot read it"),
        (str(write_json(tmp_path / "list.json", [0.1, 0.2])), "no latency samples: looked for a latency profile"),
        (str(write_json(tmp_path / "other.json", {"hello": 1})), "no latency samples: looked for"),
        (str(write_trace(tmp_path / "empty.jsonl", [])), "a trace with no samples (no \"inference\" records)"),
        (str(write_bench(tmp_path / "old.json", {"compiled": None})), "a bench report with no raw per-call samples"),
        (str(write_bench(tmp_path / "empty-bench.json", {"compiled": ([], [])})), "engine compiled: an empty"),
        (str(write_bench(tmp_path / "ragged.json", {"compiled": ([0.1], [0.1, 0.2])})), "1 libero_image_samples_s but 2"),
        (str(write_json(tmp_path / "no-samples.json", {**good, "samples_s": []})), "no samples (samples_s must be a"),
        (str(write_json(tmp_path / "strings.json", {**good, "samples_s": ["1"]})), "samples_s must hold numbers"),
        (str(write_json(tmp_path / "negative.json", {**good, "samples_s": [0.1, -0.1]})), "sample 1 is -0.1"),
        (str(write_json(tmp_path / "nan.json", {**good, "samples_s": [math.nan]})), "sample 0 is nan"),
        (str(write_json(tmp_path / "partial.json", {"format": PROFILE_FORMAT, "samples_s": [0.1]})),
         "missing engine, machine, quantity, source"),
    ]


def test_bad_files_are_one_line_naming_the_file(tmp_path):
    (tmp_path / "text.jsonl").write_text("{\"kind\": \"run\"}\nnot json\n")
    (tmp_path / "notjson.txt").write_text("latency: fast\n")
    cases = _bad_files(tmp_path) + [(str(tmp_path / "text.jsonl"), "line 2 is not JSON"),
                                    (str(tmp_path / "notjson.txt"), "not JSON or a JSONL trace")]
    for spec, message in cases:
        with pytest.raises(InputError) as err:
            latency_model_from_args(None, spec, None, seed=0)
        text = str(err.value)
        assert "\n" not in text and text.startswith(f"latency profile {spec.split(':')[0]}: "), text
        assert message in text, text


# --- the wall clock: SlowPolicy ----------------------------------------------------------------------------

class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0
        self.slept: list[float] = []

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.slept.append(seconds)
        self.t += seconds


class TimedPolicy:
    """A policy whose calls take the given seconds of the fake clock."""

    label = "timed fake"
    needs_images = False

    def __init__(self, fake: FakeClock, durations) -> None:
        self.fake, self.durations = fake, list(durations)

    def act(self, obs, instruction) -> PolicyOutput:
        self.fake.t += self.durations.pop(0)
        return PolicyOutput(action=np.zeros(7), raw_action=np.zeros(7), timings={})


@pytest.fixture
def fake(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(slow.clock, "now", fake.now)
    monkeypatch.setattr(slow, "sleep", lambda closed, seconds: fake.sleep(seconds))
    return fake


def test_slow_policy_pads_each_call_up_to_its_sample(fake):
    model = EmpiricalLatency(samples(), "recorded")  # 30, 40, 50, 60 ms
    policy = slow.SlowPolicy(TimedPolicy(fake, [0.010, 0.045, 0.020]), model)
    totals, padding = [], []
    for _ in range(3):
        t0 = fake.t
        padding.append(policy.act(None, "").timings["injected_delay"])
        totals.append(fake.t - t0)
    assert totals == pytest.approx([0.030, 0.045, 0.050])  # the 45 ms call outlasted its 40 ms: not shortened
    assert padding == pytest.approx([0.020, 0.0, 0.030])
    assert policy.label == f"timed fake, latency padded to {model.label} (sleep)"


def test_slow_policy_with_a_projected_measured_latency_doubles_the_call(fake):
    policy = slow.SlowPolicy(TimedPolicy(fake, [0.025]), latency_model_from_args(None, None, 2.0, seed=0))
    out = policy.act(None, "")
    assert out.timings["injected_delay"] == pytest.approx(0.025) and fake.t == pytest.approx(100.05)


@pytest.mark.slow
def test_run_replays_a_committed_profile_on_the_wall_clock(tmp_path):
    """`rtloop run` as a user types it (replay sim, tiny checkpoint): the header describes the model, and every
    inference lasts at least its sample, in order: the same samples the model gives here."""
    import subprocess
    import sys

    from rtloop.runtime.trace import read_trace

    profile, trace = "profiles/latency/h200-reference.json", tmp_path / "trace.jsonl"
    cmd = [sys.executable, "-m", "rtloop", "run", "--sim", "replay", "--metrics-port", "0", "--quiet", "--max-steps",
           "8", "--latency-profile", profile, "--seed", "7", "--trace", str(trace)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    records = read_trace(trace)
    model = latency_model_from_args(None, profile, None, seed=7)
    assert records[0]["latency"] == model.describe()
    assert records[0]["policy"].endswith(f", latency padded to {model.label} (sleep)")
    infs = [r for r in records if r["kind"] == "inference"]
    assert infs and all(r["t_end"] - r["t_start"] >= model.sample(r["seq"] - 1) for r in infs)
