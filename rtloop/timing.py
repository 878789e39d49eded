"""The production stage timer, beside the clock it reads: every policy stage is timed with it.

`timed_stage("generate", timings)` measures a stage with rtloop.clock and, at the same time, opens a
torch profiler range (record_function, only while a torch profiler records: it costs ~6 us a range) and, on
CUDA, an NVTX range with the same name, so the torch trace, Nsight and the JSONL trace all name stages
identically.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator

from rtloop import clock


_NVTX = None  # torch.cuda.nvtx where CUDA is available, else False: asked once, not per stage


def _nvtx():
    # torch.cuda.is_available() asks the driver; asked in every stage, the stage after a GPU wait took
    # 0.31 ms instead of 0.11 on an H100 host (scripts/host_probe.py)
    global _NVTX
    if _NVTX is None:
        import torch

        _NVTX = torch.cuda.nvtx if torch.cuda.is_available() else False
    return _NVTX


@contextmanager
def timed_stage(name: str, timings: dict[str, float], sync: Callable[[], None] | None = None) -> Iterator[None]:
    """Add the stage's wall time (seconds) to timings[name]. `sync` (e.g. torch.cuda.synchronize) runs
    before the clock stops, so asynchronous GPU work is charged to the stage that launched it."""
    import torch

    nvtx = _nvtx() or None
    t0 = clock.now()
    profiling = torch._C._autograd._profiler_enabled()
    with torch.profiler.record_function(name) if profiling else nullcontext():
        if nvtx is not None:
            nvtx.range_push(name)
        try:
            yield
            if sync is not None:
                sync()
        finally:
            if nvtx is not None:
                nvtx.range_pop()
            timings[name] = timings.get(name, 0.0) + (clock.now() - t0)
