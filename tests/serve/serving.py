"""Helpers for the serve tests: `rtloop serve` as a subprocess, and the server around any backend in-process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.from_thread

from rtloop.metrics.promapi import free_port
from rtloop.sim.replay import default_recording

DATA = default_recording()  # recorded LIBERO frames, package data (rtloop/data)
MAX_MESSAGE_BYTES = 400_000  # a 256x256 frame (192 KiB) and openpi's two 224 images (294 KiB) fit


@dataclass
class Served:
    process: subprocess.Popen
    port: int
    metrics_port: int
    log: Path

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def stderr(self) -> str:
        return self.log.read_text()


def start_serve(tmp: Path, *args: str, wait_s: float = 180) -> Served:
    """`rtloop serve --port 0 ...`; returns once it prints the port it listens on. stderr goes to a file:
    the server logs one line per refused request, and a pipe nobody reads would block it."""
    metrics_port = free_port()
    log = tmp / "serve.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "rtloop", "serve", "--port", "0", "--metrics-port",
                                    str(metrics_port), *args], stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + wait_s
    while not (m := re.search(r"listening on ws://127\.0\.0\.1:(\d+)", log.read_text())):
        assert process.poll() is None, f"rtloop serve exited ({process.returncode}):\n{log.read_text()}"
        assert time.monotonic() < deadline, f"rtloop serve not listening after {wait_s} s:\n{log.read_text()}"
        time.sleep(0.2)
    return Served(process, int(m.group(1)), metrics_port, log)


def stop_serve(served: Served) -> int:
    if served.process.poll() is None:
        served.process.send_signal(signal.SIGTERM)
    try:
        return served.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        served.process.kill()
        served.process.wait()
        raise


class InProcessServer:
    """rtloop.serve.server around any backend, on an event loop in its own thread (an anyio blocking
    portal); stop() and start() again on the same port to drop every client."""

    def __init__(self, backend, port: int = 0):
        from rtloop.serve.server import InferenceWorker, ServerMetrics

        self.worker = InferenceWorker(lambda: backend, lambda b: ServerMetrics("test", "random"))
        self.metrics = self.worker.metrics
        self.port = port

    def start(self) -> InProcessServer:
        from rtloop.serve.server import PolicyServer, bind

        server = PolicyServer(self.worker, bind("127.0.0.1", self.port))
        self.port = server.port
        self._portal_cm = anyio.from_thread.start_blocking_portal()
        portal = self._portal = self._portal_cm.__enter__()
        self._stop = portal.call(anyio.Event)
        listening = threading.Event()
        self._running = portal.start_task_soon(server.run, self._stop, listening.set)
        assert listening.wait(30)
        return self

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._portal.call(self._stop.set)
        self._running.result(timeout=30)
        self._portal_cm.__exit__(None, None, None)

    def close(self) -> None:
        self.stop()
        self.worker.close()
