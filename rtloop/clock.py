"""The one clock every timestamp in rtloop comes from.

The sim thread, the inference thread and the event loop all stamp records with `now()`, so ages and
intervals can be subtracted across threads. perf_counter is CLOCK_MONOTONIC on Linux with ns resolution.
"""

import time

now = time.perf_counter
