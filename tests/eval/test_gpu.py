"""The eval's GPU sampler on a stand-in nvidia-smi (this machine has no GPU): the child runs while the
eval does and is gone after, samples are summarised per GPU over the invocation and while episodes ran,
unreadable fields are skipped, and no GPU means n/a, never 0%."""

from __future__ import annotations

import time
from datetime import datetime

import pytest

from rtloop.eval.gpu import GpuSampler, describe

SAMPLES = """2024/05/01 12:00:00.000, 0, NVIDIA H200, 10, 1000
2024/05/01 12:00:00.000, 1, NVIDIA H200, 0, 500
2024/05/01 12:00:00.500, 0, NVIDIA H200, [N/A], 1100
2024/05/01 12:00:01.000, 0, NVIDIA H200, 90, 3000
2024/05/01 12:00:01.500, 0, NVIDIA H200, 70, 2000
2024/05/01 12:00:01.500, 1, NVIDIA H200, 4, 600
"""


@pytest.fixture
def fake_smi(tmp_path, monkeypatch):
    """An nvidia-smi that prints SAMPLES, as the real one does with -lms, then keeps running."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\ncat <<'EOF'\n{SAMPLES}EOF\nexec sleep 600\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    return smi


def test_samples_are_summarised_per_gpu_and_the_child_is_gone_after(fake_smi, tmp_path):
    path = tmp_path / "out" / "gpu.csv"
    with GpuSampler(path, "cuda") as sampler:
        deadline = time.monotonic() + 30
        while not (path.exists() and path.read_text().count("\n") >= 6):
            assert time.monotonic() < deadline, "the stand-in never wrote its samples"
            time.sleep(0.05)
        child = sampler._child
        assert child.poll() is None
    assert child.poll() is not None  # no orphan: ended with the block
    since = datetime.strptime("2024/05/01 12:00:00.750", "%Y/%m/%d %H:%M:%S.%f").timestamp()
    summary = sampler.summary(since)
    gpu0, gpu1 = summary["gpus"]
    assert (gpu0["index"], gpu0["name"]) == (0, "NVIDIA H200")
    # the [N/A] sample is skipped: 10, 90, 70
    assert gpu0["invocation"] == {"samples": 3, "utilization_mean_pct": pytest.approx(170 / 3),
                                  "utilization_p50_pct": 70.0, "memory_peak_mib": 3000.0}
    assert gpu0["running"] == {"samples": 2, "utilization_mean_pct": 80.0, "utilization_p50_pct": 80.0,
                               "memory_peak_mib": 3000.0}
    assert gpu1["invocation"]["utilization_mean_pct"] == 2.0 and gpu1["running"]["samples"] == 1
    line = describe(summary)
    assert line.startswith("GPU utilisation (nvidia-smi every 500 ms): GPU 0 (NVIDIA H200): mean 57%, p50 70%, "
                           "peak memory 2.9 GiB over the invocation; mean 80%, p50 80% while episodes ran; GPU 1")


@pytest.mark.parametrize("device, remote, reason", [
    ("cpu", False, "the policy runs on cpu"),
    ("cuda", True, "the policy's GPU is on the Ray cluster at --address, not sampled here"),
])
def test_no_gpu_to_sample_is_na_not_zero(device, remote, reason, fake_smi, tmp_path):
    with GpuSampler(tmp_path / "gpu.csv", device, remote=remote) as sampler:
        pass
    assert sampler.summary(None) == {"sampled": False, "reason": reason}
    assert describe(sampler.summary(None)) == f"GPU utilisation: n/a ({reason})."
    assert not (tmp_path / "gpu.csv").exists()


def test_without_nvidia_smi_it_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with GpuSampler(tmp_path / "gpu.csv", "cuda") as sampler:
        pass
    assert sampler.summary(None) == {"sampled": False, "reason": "no nvidia-smi on this machine"}
