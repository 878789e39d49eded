"""How long the host work after a GPU wait takes, by the way the host waits (a probe, not a benchmark):
the detokenize stage (detokenizer + action guard) right after a 25 ms GPU job, against the same work again.

    python scripts/host_probe.py [sync|spin|spin-sleep0|driver-spin|yield]
"""

import ctypes
import glob
import os
import sys
import time

import numpy as np
import torch

mode = sys.argv[1] if len(sys.argv) > 1 else "sync"
if mode in ("driver-spin", "yield"):  # cudaSetDeviceFlags before the context exists
    lib = glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "*", "lib", "libcudart.so*"))
    lib = lib or glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libcudart*.so*"))
    rc = ctypes.CDLL(lib[0]).cudaSetDeviceFlags(1 if mode == "driver-spin" else 2)
    print("cudaSetDeviceFlags", lib[0], rc)

from rtloop.policy.actions import ActionDetokenizer  # noqa: E402
from rtloop.policy.guards import Guards  # noqa: E402
from rtloop.timing import timed_stage  # noqa: E402

stats = {"action": {"q01": [-1.0] * 7, "q99": [1.0] * 7, "mask": [True] * 6 + [False]}}
detokenize, guards = ActionDetokenizer(32064, 64, 256, stats), Guards()
tokens = torch.tensor([31800, 31900, 31750, 31999, 31744, 31850, 31777]).pin_memory()
image = np.random.default_rng(0).integers(0, 255, (224, 224, 3), dtype=np.uint8)
done = torch.cuda.Event()


def wait():
    if mode in ("sync", "driver-spin", "yield"):
        torch.cuda.synchronize()
    elif mode == "spin":
        while not done.query():
            pass
    else:
        while not done.query():
            time.sleep(0)


def once():
    torch.cuda._sleep(int(25e-3 * 1.7e9))
    done.record()
    timings = {}
    with timed_stage("generate", timings, wait):
        guards.check_frame(image)
    t1 = time.perf_counter()
    with timed_stage("detokenize", timings):
        guards.check_action(detokenize(tokens.numpy()))
    t2 = time.perf_counter()
    guards.check_action(detokenize(tokens.numpy()))
    return (t2 - t1) * 1e6, (time.perf_counter() - t2) * 1e6, timings["generate"] * 1e3


r = np.array([once() for _ in range(60)][10:])
print(f"{mode:12s} detokenize stage p50 {np.median(r[:, 0]):6.1f} us, same work again {np.median(r[:, 1]):5.1f} us, "
      f"generate {np.median(r[:, 2]):.2f} ms")
