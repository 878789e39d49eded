"""Child processes that rtloop starts and must not leave behind (nvidia-smi, Prometheus)."""

from __future__ import annotations

import subprocess


def stop(process: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM, then SIGKILL if it is still running after `grace_s`; returns once it is reaped. A child that
    has already exited is only reaped."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
