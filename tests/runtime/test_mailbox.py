import threading

import anyio
import numpy as np

from rtloop.sim.base import Observation
from rtloop.runtime.mailbox import Frame, LatestFrameMailbox
from rtloop.runtime.worker import WorkerThread


def frame(seq: int) -> Frame:
    return Frame(seq, Observation(np.full((2, 2, 3), seq, dtype=np.uint8)), float(seq))


def test_put_over_an_unread_frame_counts_a_drop_and_newest_wins():
    async def main():
        box = LatestFrameMailbox()
        box.put(frame(0))
        box.put(frame(1))
        box.put(frame(2))
        got = await box.get()
        assert got.seq == 2 and box.dropped == 2
        box.put(frame(3))  # the previous one was taken: not a drop
        assert (await box.get()).seq == 3 and box.dropped == 2

    anyio.run(main)


def test_get_waits_for_a_frame_newer_than_the_last_one_taken():
    async def main():
        box = LatestFrameMailbox()
        box.put(frame(0))
        assert (await box.get()).seq == 0
        got = []

        async def consumer():
            got.append(await box.get())

        async with anyio.create_task_group() as tg:
            tg.start_soon(consumer)
            await anyio.sleep(0.05)
            assert got == []  # nothing new yet: still waiting, not handed frame 0 again
            box.put(frame(1))
        assert [f.seq for f in got] == [1] and box.dropped == 0

    anyio.run(main)


def test_worker_runs_every_call_on_one_thread_and_leaves_none_behind():
    worker = WorkerThread("rtloop-test-worker")

    async def main():
        idents = {await worker.run(threading.get_ident) for _ in range(5)}
        assert len(idents) == 1 and threading.get_ident() not in idents

    anyio.run(main)
    worker.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("rtloop-test-worker")]


def test_a_cancelled_caller_stops_waiting_and_the_call_finishes_on_its_thread():
    """Cancellation does not wait out a blocking call (an extra inference at an episode's end), yet the call
    is not abandoned: it completes on its thread, the next call runs after it, and close() joins the thread."""
    worker = WorkerThread("rtloop-test-worker")
    release, finished = threading.Event(), []

    def blocked():
        release.wait()
        finished.append("blocked")

    async def main():
        with anyio.CancelScope() as scope:
            scope.cancel()  # cancelled before the call even starts waiting
            await worker.run(blocked)
        assert scope.cancelled_caught and finished == []  # the caller is free, the call still runs
        release.set()
        await worker.run(finished.append, "next")  # runs after the abandoned call, on the same thread

    anyio.run(main)
    worker.close()
    assert finished == ["blocked", "next"]
    assert not [t for t in threading.enumerate() if t.name.startswith("rtloop-test-worker")]
