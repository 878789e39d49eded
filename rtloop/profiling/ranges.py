"""The stage ranges the profilers see are opened by the production timer, rtloop.timing.timed_stage (its
record_function and NVTX ranges); this name stays importable for code written before it moved."""

from rtloop.timing import timed_stage

__all__ = ["timed_stage"]
