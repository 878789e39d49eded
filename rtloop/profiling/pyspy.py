"""Run a command under `py-spy record` and read back what it sampled.

Flags, chosen on the 2-core CPU dev machine (py-spy 0.4.3, root):
- `--format speedscope`: one recording keeps every sample per thread; the SVG is drawn from it
  (rtloop.profiling.flamegraph), so there is one run to profile, not two.
- `--threads`: each stack starts with a `thread (tid): name` frame, so the sim thread, the inference
  thread and the event loop are separate towers in the flame graph.
- `--subprocesses`: `rtloop` may be a console-script wrapper or start helpers; follow them.
- `--native` only when asked (`rtloop profile --native`): it shows what the C/C++ under Python is doing
  (MuJoCo, EGL rendering, OpenMP/ATen kernels; without it a torch matmul is one opaque Python line), but
  native unwinding pauses the process longer per sample: on 2 cores it stretched a 60-tick LIBERO run ~4x,
  ~9% of samples failed, and py-spy's idle detection became unreliable (threads in epoll_wait or waiting
  for the GIL sampled as busy; benfred/py-spy#92). Python-only sampling barely disturbs the loop.
- no `--idle`: only on-CPU samples are recorded, so a thread's summed sample weight is its busy time,
  which is what the per-thread report needs. `--idle` (opt-in) shows where threads wait instead.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

from rtloop.errors import RtloopError

PTRACE_HINT = (
    "py-spy cannot attach (no ptrace permission): run as root, or start the container with "
    "`--cap-add SYS_PTRACE`, or `sysctl kernel.yama.ptrace_scope=0`; the torch profiler still ran"
)
_PERMISSION_WORDS = ("Permission denied", "Operation not permitted", "ptrace", "os error 1)", "os error 13)")


@dataclass
class PySpyResult:
    ok: bool
    returncode: int
    message: str  # one line: why py-spy produced nothing, or ""
    stderr_tail: str
    samples: int | None = None  # py-spy's own count, and the samples it failed to take (native unwinding)
    errors: int | None = None
    max_behind_s: float = 0.0  # how far sampling fell behind its schedule: >0 means fewer samples than asked


def find_py_spy() -> str:
    """py-spy is a dependency; it lives next to the interpreter in a venv even when PATH lacks it."""
    beside = os.path.join(os.path.dirname(sys.executable), "py-spy")
    found = beside if os.access(beside, os.X_OK) else shutil.which("py-spy")
    if not found:
        raise RtloopError("py-spy not found: `pip install py-spy` (it is a dependency of rtloop)")
    return found


def record_command(
    py_spy: str, output: str, rate_hz: int, native: bool, idle: bool, target: list[str]
) -> list[str]:
    cmd = [py_spy, "record", "--format", "speedscope", "--output", output, "--rate", str(rate_hz)]
    cmd += ["--threads", "--subprocesses"]
    if native:
        cmd.append("--native")
    if idle:
        cmd.append("--idle")
    return cmd + ["--", *target]


def record(cmd: list[str], output: str, log_path: str) -> PySpyResult:
    """Run py-spy (which runs the target); the target's stdout/stderr go to log_path."""
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    with open(log_path) as log:
        text = log.read()
    tail = text[-4000:]
    ok = os.path.exists(output) and os.path.getsize(output) > 0
    message = ""
    if not ok:
        if any(w in tail for w in _PERMISSION_WORDS):
            message = PTRACE_HINT
        else:
            last = next((ln for ln in reversed(tail.splitlines()) if ln.strip()), "no output")
            message = f"py-spy wrote no profile (exit {proc.returncode}): {last.strip()}"
    counts = re.search(r"Samples: (\d+) Errors: (\d+)", text)
    behind = [float(x) for x in re.findall(r"([\d.]+)s behind in sampling", text)]
    return PySpyResult(ok, proc.returncode, message, tail,
                       samples=int(counts[1]) if counts else None, errors=int(counts[2]) if counts else None,
                       max_behind_s=max(behind, default=0.0))


def probe(py_spy: str, native: bool, work_dir: str) -> PySpyResult:
    """Record a half-second Python child with the same flags: learn whether py-spy can sample here before
    starting the real run (if it cannot, the run is started plainly, once)."""
    output = os.path.join(work_dir, "probe.speedscope.json")
    target = [sys.executable, "-c", "import time; time.sleep(0.5)"]
    result = record(record_command(py_spy, output, 100, native, False, target), output,
                    os.path.join(work_dir, "probe.log"))
    for leftover in (output, os.path.join(work_dir, "probe.log")):
        if os.path.exists(leftover):
            os.remove(leftover)
    return result
