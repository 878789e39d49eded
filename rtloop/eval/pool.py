"""Episodes in worker processes (spawn), results back to the parent as each finishes.

The parent is the only writer of the results file. Workers take (cell, task, episode) keys from one queue
in order, so a worker's consecutive episodes mostly share a cell and a task, and with them its env and
policy. Workers ignore SIGINT (Ctrl-C reaches the whole process group; the parent decides): on Ctrl-C or
SIGTERM the parent terminates them, losing only the episodes in flight, which a rerun does again. A worker
that dies (say, a crash in the renderer) costs its episode an error row, and a new worker takes its place.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
from typing import Callable

from rtloop.eval.grid import Key

POLL_S = 0.5  # how often the parent looks for dead workers while it waits


def error_row(key: Key, error: str) -> dict:
    cell, task, episode = key
    return {"cell": cell, "task": task, "episode": episode, "success": False, "error": error}


def _worker(specs: dict[str, dict], todo: mp.Queue, done: mp.Queue, log_path: str | None) -> None:
    if log_path is not None:  # LIBERO's chatter and each worker's alerts would fight the progress bar
        log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
    from rtloop.eval.episode import close_runner, run_one_episode
    from rtloop.runtime.loop import one_line

    pid = os.getpid()
    try:
        while (key := todo.get()) is not None:
            done.put(("start", pid, key))
            try:
                row = run_one_episode(specs[key[0]], key[1], key[2])
            except Exception as exc:  # a failed env or policy build: this episode's error, the sweep goes on
                row = error_row(key, ": ".join(one_line(exc)))
            done.put(("row", pid, row))
    finally:
        close_runner()


def raise_interrupt(signum, frame) -> None:
    """A SIGTERM handler: the runners treat SIGTERM as Ctrl-C."""
    raise KeyboardInterrupt


def run_episodes(specs: dict[str, dict], keys: list[Key], workers: int, on_row: Callable[[dict], None],
                 log_path: str | None = None) -> None:
    """Run every key in `workers` processes; on_row(row) in the parent as each episode ends. The workers'
    stdout and stderr go to log_path when given. Ctrl-C and SIGTERM raise KeyboardInterrupt here, after
    the workers are gone."""
    ctx = mp.get_context("spawn")  # the parent may hold threads, CUDA, EGL: never fork it
    todo, done = ctx.Queue(), ctx.Queue()
    for key in keys:
        todo.put(key)
    for _ in range(workers):
        todo.put(None)
    procs: dict[int, mp.Process] = {}

    def start_worker() -> None:
        ignore = signal.signal(signal.SIGINT, signal.SIG_IGN)  # an ignored signal stays ignored across exec
        try:
            proc = ctx.Process(target=_worker, args=(specs, todo, done, log_path), name="rtloop-episodes")
            proc.start()
        finally:
            signal.signal(signal.SIGINT, ignore)
        procs[proc.pid] = proc

    previous_term = signal.signal(signal.SIGTERM, raise_interrupt)
    in_flight: dict[int, Key] = {}
    left = len(keys)
    try:
        for _ in range(min(workers, len(keys))):
            start_worker()
        while left:
            try:
                kind, pid, payload = done.get(timeout=POLL_S)
            except queue.Empty:
                for pid, proc in list(procs.items()):
                    if proc.exitcode not in (None, 0):
                        del procs[pid]
                        if pid in in_flight:
                            on_row(error_row(in_flight.pop(pid), f"worker: its process died (exit code {proc.exitcode})"))
                            left -= 1
                        if left > len(in_flight):
                            start_worker()
                continue
            if kind == "start":
                in_flight[pid] = tuple(payload)
            else:
                in_flight.pop(pid, None)
                on_row(payload)
                left -= 1
        for proc in procs.values():  # each takes its None and closes its env
            proc.join(timeout=60)
    finally:
        for proc in procs.values():
            if proc.is_alive():
                proc.terminate()
        for proc in procs.values():
            proc.join()
        todo.cancel_join_thread()  # keys never taken must not hold the parent's exit
        signal.signal(signal.SIGTERM, previous_term)
