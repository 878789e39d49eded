"""GPU utilisation over an eval: `nvidia-smi` samples every GPU every 500 ms as a child process, into
DIR/gpu.csv, for the whole invocation; the report gives each GPU's mean and median utilisation and its
peak memory, over the invocation and over the part where episodes ran (builds and warm-up excluded).
Where the policy runs on no GPU of this machine there is nothing to sample: the report says n/a (and why),
never 0%.
"""

from __future__ import annotations

import shutil
import subprocess
from datetime import datetime
from pathlib import Path

import numpy as np

from rtloop.children import stop

INTERVAL_MS = 500
QUERY = "timestamp,index,name,utilization.gpu,memory.used"
TIMESTAMP = "%Y/%m/%d %H:%M:%S.%f"  # nvidia-smi's, local time


class GpuSampler:
    """A context manager: the sampling child runs while the block does, and is gone when it ends."""

    def __init__(self, path: Path, device: str, remote: bool = False) -> None:
        """remote: the policy runs on a Ray cluster given by --address, whose GPUs this machine cannot see."""
        self.path = Path(path)
        self.reason: str | None = None  # why nothing is sampled
        if not device.startswith("cuda"):
            self.reason = f"the policy runs on {device}"
        elif remote:
            self.reason = "the policy's GPU is on the Ray cluster at --address, not sampled here"
        elif shutil.which("nvidia-smi") is None:
            self.reason = "no nvidia-smi on this machine"
        self._child: subprocess.Popen | None = None

    def __enter__(self) -> GpuSampler:
        if self.reason is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("wb") as out:  # the child holds its own copy of the descriptor
                self._child = subprocess.Popen(
                    ["nvidia-smi", f"--query-gpu={QUERY}", "--format=csv,noheader,nounits", "-lms", str(INTERVAL_MS)],
                    stdout=out, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc) -> None:
        if self._child is not None:
            stop(self._child, grace_s=5)

    def summary(self, running_since: float | None = None) -> dict:
        """Per GPU, over the invocation and from `running_since` (time.time() when the episodes began)."""
        if self.reason is not None:
            return {"sampled": False, "reason": self.reason}
        samples = parse_samples(self.path.read_text(encoding="utf-8", errors="replace"))
        if not samples:
            return {"sampled": False, "reason": "nvidia-smi gave no samples"}
        gpus = []
        for index in sorted({s[1] for s in samples}):
            mine = [s for s in samples if s[1] == index]
            running = [s for s in mine if running_since is not None and s[0] >= running_since]
            gpus.append({"index": index, "name": mine[0][2], "invocation": stats(mine),
                         "running": stats(running) if running else None})
        return {"sampled": True, "source": f"nvidia-smi every {INTERVAL_MS} ms", "file": str(self.path), "gpus": gpus}


def parse_samples(text: str) -> list[tuple[float, int, str, float, float]]:
    """(time, index, name, utilisation %, memory MiB) per line; lines with a field nvidia-smi could not
    read ([N/A], [Not Supported]) or cut short by the child's end are skipped."""
    out = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 5:
            continue
        try:
            when = datetime.strptime(parts[0], TIMESTAMP).timestamp()
            out.append((when, int(parts[1]), ", ".join(parts[2:-2]), float(parts[-2]), float(parts[-1])))
        except ValueError:
            continue
    return out


def stats(samples: list[tuple[float, int, str, float, float]]) -> dict:
    utilisation = np.asarray([s[3] for s in samples])
    return {"samples": len(samples), "utilization_mean_pct": float(utilisation.mean()),
            "utilization_p50_pct": float(np.median(utilisation)),
            "memory_peak_mib": max(s[4] for s in samples)}


def describe(gpu: dict) -> str:
    """The report's line."""
    if not gpu["sampled"]:
        return f"GPU utilisation: n/a ({gpu['reason']})."
    parts = []
    for g in gpu["gpus"]:
        whole, running = g["invocation"], g["running"]
        text = (f"GPU {g['index']} ({g['name']}): mean {whole['utilization_mean_pct']:.0f}%, p50 "
                f"{whole['utilization_p50_pct']:.0f}%, peak memory {whole['memory_peak_mib'] / 1024:.1f} GiB over the "
                f"invocation")
        if running is not None:
            text += (f"; mean {running['utilization_mean_pct']:.0f}%, p50 {running['utilization_p50_pct']:.0f}% "
                     f"while episodes ran")
        parts.append(text)
    return f"GPU utilisation ({gpu['source']}): " + "; ".join(parts) + "."
