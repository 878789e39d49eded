"""What the websocket hop adds per inference: RemotePolicy.act against `rtloop serve`'s server code in another
process, versus the same trivial policy called in-process. The policy does no work (a zero action), so the
difference is the hop itself: msgpack both ways, loopback TCP, the server's validation and its handoff to
the inference thread and back.

    python scripts/ws_overhead.py                      # 224 and 256 frames, 3 x 2000 calls, JSON to stdout
    python scripts/ws_overhead.py --out profiles/ws-overhead-cpu.json

Not a test: a measurement (numbers vary with machine load; the JSON records the load average).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rtloop import clock  # noqa: E402
from rtloop.serve.protocol import Request  # noqa: E402
from rtloop.serve.server import Result  # noqa: E402


class ZeroPolicy:
    """A trivial, fast policy: always the zero action."""

    max_batch = 1
    metadata = {"server": "rtloop", "label": "zero policy (ws_overhead.py)", "action_shape": [1, 7]}
    zeros = np.zeros((1, 7))

    def act_batch(self, requests: list[Request], streams: list[int]) -> list[Result]:
        return [Result(self.zeros, self.zeros) for _ in requests]

    def end_stream(self, stream: int) -> None:
        pass

    def act(self, frame: np.ndarray, instruction: str) -> np.ndarray:  # the in-process call
        return self.zeros[0]


def serve() -> None:
    import anyio

    from rtloop.serve.server import InferenceWorker, PolicyServer, ServerMetrics, bind

    worker = InferenceWorker(ZeroPolicy, lambda b: ServerMetrics("zero", "random"))
    server = PolicyServer(worker, bind("127.0.0.1", 0))
    async def until_killed() -> None:
        await server.run(anyio.Event(), lambda: print(server.port, flush=True))

    try:
        anyio.run(until_killed)
    except KeyboardInterrupt:
        pass
    finally:
        worker.close()


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()), "n": len(ms)}


def measure(size: int, calls: int, warmup: int) -> dict:
    from rtloop.serve.client import RemotePolicy
    from rtloop.sim.base import Observation

    frame = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    obs = Observation(frame)
    local = ZeroPolicy()
    in_process = []
    for i in range(warmup + calls):
        t0 = clock.now()
        local.act(obs.image, "pick up the soup")
        if i >= warmup:
            in_process.append(clock.now() - t0)

    server = subprocess.Popen([sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        policy = RemotePolicy(f"ws://127.0.0.1:{port}")
        remote, network = [], []
        for i in range(warmup + calls):
            out = policy.act(obs, "pick up the soup")
            if i >= warmup:
                remote.append(out.timings["round_trip"])
                network.append(out.timings["network"])
        policy.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    hop = percentiles(remote)
    base = percentiles(in_process)
    return {
        "frame": [size, size, 3], "calls": calls, "warmup": warmup,
        "in_process": base, "remote_round_trip": hop, "remote_network_share": percentiles(network),
        "hop_adds_p50_ms": hop["p50_ms"] - base["p50_ms"], "hop_adds_p99_ms": hop["p99_ms"] - base["p99_ms"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the server process
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 256], help="square frame sides (default 224 256)")
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3, help="independent runs per size (load on a shared machine varies)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.serve:
        serve()
        return 0
    report = {
        "what": "websocket hop overhead per inference on loopback: RemotePolicy.act against rtloop serve's server "
                "(other process, zero policy) minus the same policy called in-process",
        "machine": {"host": platform.node(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_before": os.getloadavg()},
        "versions": {d: metadata.version(d) for d in ("websockets", "msgpack", "numpy")} | {
            "python": platform.python_version()},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "results": [measure(size, args.calls, args.warmup) for size in args.sizes for _ in range(args.repeats)],
    }
    for size in args.sizes:
        runs = [r for r in report["results"] if r["frame"][0] == size]
        report[f"summary_{size}"] = {k: sorted(r[k] for r in runs) for k in ("hop_adds_p50_ms", "hop_adds_p99_ms")}
    report["machine"]["loadavg_after"] = os.getloadavg()
    text = json.dumps(report, indent=2) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
