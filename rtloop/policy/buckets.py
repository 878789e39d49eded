"""The batch sizes the batched engines capture one CUDA graph each for. Torch-free: the fleet, the metrics and
the commands read them without importing an engine."""

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)
MAX_BATCH = BATCH_BUCKETS[-1]


def batch_bucket(batch: int) -> int:
    """The smallest bucket that holds `batch` frames (batch <= MAX_BATCH)."""
    return next(b for b in BATCH_BUCKETS if b >= batch)
