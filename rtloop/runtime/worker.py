"""A dedicated OS thread that runs blocking calls for the event loop, always on the same thread.

Why not `anyio.to_thread.run_sync` with a CapacityLimiter: a limiter bounds how many calls run at once,
but anyio's pool hands each call to whichever idle worker it pops, so the sim's calls and the model's calls
end up on each other's threads. That breaks MuJoCo's EGL renderer (its GL context is current only on the
thread that created it; robosuite's render() does not make it current again) and torch's thread-local
modes. So the env is created, stepped and closed on one thread, and the policy runs on another.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, TypeVar

import anyio

T = TypeVar("T")


class WorkerThread:
    def __init__(self, name: str) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def run(self, fn: Callable[..., T], *args) -> T:
        """Run fn(*args) on this thread and wait for it. A blocking call cannot be interrupted: on
        cancellation (end of episode, a signal) the caller stops waiting at once and the call finishes on
        its thread, its result dropped. Calls run one at a time in order, so the next one (the env's close,
        the next episode's reset) starts only after it; close() waits for it, so no thread outlives the run."""
        # Told without blocking this thread (anyio.from_thread.run_sync would wait for the loop, forever
        # when the loop has stopped after abandoning the call). rtloop runs on anyio's asyncio backend.
        loop = asyncio.get_running_loop()
        finished = anyio.Event()

        def job() -> T:
            try:
                return fn(*args)
            finally:
                try:
                    loop.call_soon_threadsafe(finished.set)
                except RuntimeError:  # the event loop is closed: nobody waits for this call any more
                    pass

        future = self._pool.submit(job)
        await finished.wait()
        return future.result()

    def submit(self, fn: Callable[..., T], *args) -> Future[T]:
        """For code outside the event loop (setup, teardown)."""
        return self._pool.submit(fn, *args)

    def call(self, fn: Callable[..., T], *args) -> T:
        return self._pool.submit(fn, *args).result()

    def close(self) -> None:
        """Waits for the call in flight (an abandoned one included), then ends the thread."""
        self._pool.shutdown(wait=True)
