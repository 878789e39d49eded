"""`rtloop bench` as a user runs it: a real CLI process on the tiny checkpoint and the recorded LIBERO frames."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from rtloop.cli import main as rtloop_main


def rtloop(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rtloop", *argv], capture_output=True, text=True, timeout=timeout)


def test_bench_writes_the_comparable_report(tmp_path):
    out = tmp_path / "bench-cpu-tiny"
    r = rtloop("bench", "--device", "cpu", "--engines", "reference,eager", "--iters", "2", "--warmup", "0",
               "--agreement-frames", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["device"].startswith("cpu") and report["floor_ms"] > 0 and report["bandwidth_gbps"] > 0
    assert report["size"] == "tiny" and report["iterations"] == 2
    assert list(report["engines"]) == ["reference", "eager"]
    for result in report["engines"].values():
        assert set(result["stages"]) == {"libero_image", "processor", "generate", "detokenize"}
        assert result["warmup_s"] >= 0
        for timing in [*result["stages"].values(), result["predict_action"]]:
            assert 0 < timing["p50_ms"] <= timing["p95_ms"] <= timing["p99_ms"]
        assert result["hz"] == pytest.approx(1000 / result["predict_action"]["p50_ms"], rel=0.01)
        assert result["peak_mem_gb"] is None  # CPU: no allocator peak; the process RSS is reported instead
        # the raw per-call seconds are kept (latency models replay them), and the percentiles are theirs
        calls, prep = result["predict_action_samples_s"], result["libero_image_samples_s"]
        assert len(calls) == len(prep) == 2
        assert result["predict_action"]["p50_ms"] == pytest.approx(500 * (calls[0] + calls[1]), abs=1e-3)
    assert report["peak_rss_gb"] > 0
    assert report["kernels"]["pdl"] is False  # a CPU run launches no kernels, programmatically or otherwise
    assert report["kernels"]["prefill_splits"] == []  # the prefill split is CUDA streams: never on a CPU
    # the official-path engine and ours pick the same greedy tokens on real frames
    assert report["engines"]["reference"]["agreement"]["baseline"] == "eager"
    assert report["engines"]["reference"]["agreement"]["token_agreement"] == 1.0
    table = out.with_suffix(".md").read_text()
    assert "| reference |" in table and "| eager |" in table and "floor" in table and "PDL off" in table
    assert "prefill GEMMs whole" in table
    assert "| eager |" in r.stdout  # the same table on screen
    from rtloop.runtime.latency import latency_model_from_args

    eager = report["engines"]["eager"]
    model = latency_model_from_args(None, f"{out}.json:eager", None, seed=0, order="recorded")
    assert model.label == f"empirical: eager on {report['device']} ({out}.json, 2 samples, recorded order)"
    assert model.sample(1) == eager["libero_image_samples_s"][1] + eager["predict_action_samples_s"][1]


BAD_INPUT = [
    (["--engines", "graphed", "--device", "cpu"], "engine 'graphed' needs a CUDA device"),
    (["--engines", "eager,turbo", "--device", "cpu"], "unknown engine 'turbo'"),
    (["--quant", "int4", "--device", "cpu"], "unknown weight format 'int4'"),
    (["--iters", "0"], "--iters and --agreement-frames must be >= 1"),
    (["--checkpoint", "/nonexistent/ckpt"], "no such directory"),
    (["--batch", "1,x", "--device", "cpu"], "--batch '1,x': expected comma-separated frame counts"),
    (["--batch", "1,64", "--device", "cpu"], "distinct frame counts from 1 to 32"),
    (["--kernel-arch", "sm89", "--device", "cpu"], "kernel architecture sm89 cannot be forced on a CPU"),
]


@pytest.mark.parametrize("argv, message", BAD_INPUT)
def test_bench_bad_input_is_one_line(argv, message, capfd):
    """The CLI's entry point in this process, its output captured at the file descriptors (a process per case
    spent ~3 s importing torch; the test below keeps that import in a real process)."""
    assert rtloop_main(["bench", *argv]) == 2
    err = capfd.readouterr().err
    assert err.strip().count("\n") == 0 and message in err, err


def test_bench_bad_input_of_a_real_process_is_one_line():
    argv, message = BAD_INPUT[1]
    r = rtloop("bench", *argv, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and message in r.stderr, r.stderr


def test_bench_names_the_split_prefill_gemms():
    from rtloop.bench import _kernels_text

    split = {"rows": 288, "k": 4096, "n": 12288, "dtype": "float8_e4m3fn", "split": 256}
    whole = {"rows": 288, "k": 4096, "n": 4096, "dtype": "float8_e4m3fn", "split": 0}
    k = {"triton": "3.6.0", "autotune": True, "pdl": True, "prefill_split": True, "prefill_splits": [split, whole]}
    assert _kernels_text(k).endswith("prefill GEMMs split: float8_e4m3fn 288x4096 -> 12288 at row 256")
    assert _kernels_text(k | {"prefill_split": False}).endswith("prefill GEMMs whole (--no-prefill-split)")
    assert "fixed tile (--no-autotune)" in _kernels_text(k | {"autotune": False})
    assert "PDL off, sm89 code paths (forced)," in _kernels_text(k | {"pdl": False, "arch": "sm89", "forced_arch": True})
    assert "prefill" not in _kernels_text({"triton": "3.6.0", "autotune": True, "pdl": True})  # older reports


def test_bench_batches_on_cpu(tmp_path):
    """`rtloop bench --batch` on the tiny checkpoint: per batch size, latency, frames/s, the prefill timed
    alone with its FLOPs, and every frame's tokens against its batch-1 tokens (equal in fp32)."""
    from rtloop.bench import prefill_flops
    from rtloop.policy.checkpoint import make_config
    from rtloop.policy.config import OpenVLAConfig

    out = tmp_path / "bench-batch"
    r = rtloop("bench", "--size", "tiny", "--device", "cpu", "--engines", "eager", "--batch", "1,2,4", "--iters", "1",
               "--warmup", "0", "--agreement-frames", "4", "--out", str(out))
    assert r.returncode == 0, r.stderr
    report = json.loads(out.with_suffix(".json").read_text())
    batches = report["engines"]["eager"]["batches"]
    assert list(batches) == ["1", "2", "4"]
    config = OpenVLAConfig.from_dict(make_config("tiny"))
    for size, b in batches.items():
        assert 0 < b["predict_action"]["p50_ms"] <= b["predict_action"]["p99_ms"]
        assert b["frames_per_s"] == pytest.approx(int(size) * 1000 / b["predict_action"]["p50_ms"], rel=0.01)
        pre = b["prefill"]
        assert pre["frames_computed"] == int(size) and pre["positions"] > 256 and pre["ms"] > 0
        assert pre["flops"] == prefill_flops(config, int(size), pre["positions"])
        if size != "1":
            assert b["agreement_vs_batch1"]["token_agreement"] == 1.0
    assert "| eager | 4 |" in out.with_suffix(".md").read_text()


def test_prefill_flops_of_7b_are_about_two_per_weight_per_position():
    from rtloop.bench import prefill_flops
    from rtloop.policy.checkpoint import make_config
    from rtloop.policy.config import OpenVLAConfig

    config = OpenVLAConfig.from_dict(make_config("7b"))
    flops = prefill_flops(config, 1, 288)
    # 6.5e9 weights in the 32 layers, 2 FLOPs each per position: ~3.7 TFLOP, less the last layer's rows
    assert 3.4e12 < flops < 3.9e12
    assert prefill_flops(config, 8, 288) == 8 * flops


def test_bench_times_a_policy_it_is_given_and_leaves_its_engine(tmp_path, tiny_checkpoint, monkeypatch):
    """scripts/fleet_study.py's path: bench on a policy already built (its buckets captured), not a new one,
    and no checkpoint directory made for one; an engine other than the policy's is refused in one line."""
    import tempfile

    from rtloop import bench
    from rtloop.cli import build_parser
    from rtloop.errors import InputError
    from rtloop.policy.openvla import OpenVLAPolicy

    policy = OpenVLAPolicy(tiny_checkpoint, engine="eager", max_batch=2)
    engine = policy.engine
    argv = ["bench", "--size", "tiny", "--device", "cpu", "--engines", "eager", "--batch", "1,2", "--iters", "1",
            "--warmup", "0", "--agreement-frames", "2", "--out", str(tmp_path / "given")]
    made = []
    monkeypatch.setattr(tempfile, "TemporaryDirectory", lambda **kw: made.append(kw) or tmp_path)
    assert bench.main(build_parser("bench").parse_args(argv), policy=policy) == 0
    assert made == []
    assert policy.engine is engine
    assert list(json.loads((tmp_path / "given.json").read_text())["engines"]["eager"]["batches"]) == ["1", "2"]
    wrong = build_parser("bench").parse_args([*argv[:6], "reference", *argv[7:]])
    with pytest.raises(InputError, match="a built policy times its own engine"):
        bench.main(wrong, policy=policy)
