"""What crosses between the fleet's parent and a local env worker process: msgpack messages over a pipe
(no pickle), and frames through a ring of shared-memory slots, so an image is written once by the worker
and copied once by the parent, only when it goes into a batch.

A slot is a seqlock: the writer sets its header to -1, writes the image, then sets the header to the
frame's sequence number; the reader copies the image and keeps it only if the header read the frame's
number before and after the copy. x86 keeps stores and loads in program order (TSO), which is all this
needs; a frame overwritten mid-copy is reported as gone, never returned torn.
"""

from __future__ import annotations

from multiprocessing import shared_memory

import msgpack
import numpy as np

SLOTS = 4  # a frame is overwritten only after 3 newer ones: 150 ms at 20 Hz, far longer than a take
HEADER = 8  # one int64 per slot: the sequence number of the frame in it, -1 while being written


def pack(message: list) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpack(data: bytes) -> list:
    return msgpack.unpackb(data, raw=False)


def pack_arrays(arrays: dict[str, np.ndarray]) -> dict:
    """Privileged state (a few small arrays) as raw bytes with dtype and shape."""
    out = {}
    for key, a in arrays.items():
        a = np.ascontiguousarray(a)
        out[key] = [a.dtype.str, list(a.shape), a.tobytes()]
    return out


def unpack_arrays(packed: dict) -> dict[str, np.ndarray]:
    return {k: np.frombuffer(raw, dtype=np.dtype(dt)).reshape(shape).copy() for k, (dt, shape, raw) in packed.items()}


class FrameRing:
    """SLOTS frames of one shape in one shared-memory block. The worker creates it (it knows the shape)
    and unlinks it when it exits; the parent attaches by name and unlinks it if the worker died first."""

    def __init__(self, shape: tuple[int, ...], name: str | None = None) -> None:
        self.shape = tuple(shape)
        self.frame_bytes = int(np.prod(self.shape))
        size = SLOTS * (HEADER + self.frame_bytes)
        self.block = shared_memory.SharedMemory(name=name, create=name is None, size=size if name is None else 0)
        self.name = self.block.name
        self._headers = np.ndarray((SLOTS,), dtype=np.int64, buffer=self.block.buf)
        self._frames = np.ndarray((SLOTS, *self.shape), dtype=np.uint8, buffer=self.block.buf, offset=SLOTS * HEADER)
        if name is None:
            self._headers[:] = -1

    def write(self, seq: int, image: np.ndarray) -> int:
        slot = seq % SLOTS
        self._headers[slot] = -1
        self._frames[slot] = image
        self._headers[slot] = seq
        return slot

    def read(self, slot: int, seq: int) -> np.ndarray | None:
        if self._headers[slot] != seq:
            return None
        image = self._frames[slot].copy()
        return image if self._headers[slot] == seq else None

    def close(self, unlink: bool = False) -> None:
        del self._headers, self._frames  # the block refuses to close while arrays view it
        self.block.close()
        if unlink:
            try:
                self.block.unlink()
            except FileNotFoundError:  # the other side unlinked it first
                pass
