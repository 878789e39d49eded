"""How long a full garbage collection stops a process that holds a warm engine, before and after rtloop's
heap freeze (rtloop/runtime/heap.py): the probe behind the README's "Python's garbage collector".

    python3 scripts/gc_probe.py --engine compiled+fp8 --device cuda --out gc-h200.json   # random 7B weights
    python3 scripts/gc_probe.py --engine eager --device cpu --size tiny --out gc-cpu.json # a dry run

The 7B model is built with random weights in device memory (no checkpoint written; a tiny checkpoint gives
the tokenizer). The JSON is rewritten after each step, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", default="compiled+fp8")
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", default="7b", choices=["7b", "tiny"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()

    import numpy as np
    import torch

    from rtloop.policy.checkpoint import build_random_model, make_checkpoint
    from rtloop.policy.cuda_wait import set_cuda_wait
    from rtloop.policy.openvla import OpenVLAPolicy
    from rtloop.runtime import heap
    from rtloop.sim.base import Observation

    if a.device == "cuda":
        set_cuda_wait("blocking")  # as the policy asks, before the first CUDA call below makes the context
    doc: dict = {"engine": a.engine, "device": a.device, "size": a.size, "weights": f"RANDOM WEIGHTS ({a.size})",
                 "torch": torch.__version__, "gpu": torch.cuda.get_device_name() if a.device == "cuda" else None}

    def save(**fields) -> None:
        doc.update(fields)
        a.out.write_text(json.dumps(doc, indent=2) + "\n")
        print(json.dumps(fields), flush=True)

    def collections() -> list[float]:
        seconds = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            gc.collect()
            seconds.append(round(time.perf_counter() - t0, 4))
        return seconds

    def objects() -> list[int]:
        return [len(gc.get_objects(generation)) for generation in range(3)]

    save(before_build={"objects": objects(), "full_collection_s": collections()})
    checkpoint = Path(tempfile.mkdtemp()) / "tokenizer"
    make_checkpoint("tiny", checkpoint, seed=0)
    model = build_random_model("7b", a.device, torch.bfloat16, seed=0) if a.size == "7b" else None
    t0 = time.perf_counter()
    policy = OpenVLAPolicy(checkpoint, suite="libero_object", device=a.device, engine=a.engine, model=model)
    frame = Observation(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))
    policy.warmup(frame, "pick up the alphabet soup and place it in the basket")
    save(warm_s=round(time.perf_counter() - t0, 1),
         warm={"objects": objects(), "full_collection_s": collections()})
    frozen = heap.freeze()
    save(frozen_objects=frozen, after_freeze={"objects": objects(), "full_collection_s": collections()})
    policy.close()


if __name__ == "__main__":
    main()
