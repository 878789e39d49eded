"""How the host waits for the GPU: by sleeping in the driver (`blocking`, rtloop's default) or by spinning a
core (`spin`, CUDA's default when a machine has more cores than GPUs).

Why it matters for a closed loop: a thread spinning in cudaDeviceSynchronize slowed LIBERO's physics on
other cores of the H200 machine, from another process too, and not by holding the GIL (README, "Closed loop
on real LIBERO, H200"; profiles/libero-h200/alone/). A waiting thread that sleeps costs a wake-up instead.

The choice is the primary context's scheduling flag, set through the driver before the first CUDA call of
the process makes the context; it then holds for every wait (synchronize, event waits, device-to-host
copies), in torch and in our kernels alike.
"""

from __future__ import annotations

import ctypes

MODES = ("blocking", "spin")
_FLAGS = {"spin": 0x01, "blocking": 0x04}  # CU_CTX_SCHED_SPIN, CU_CTX_SCHED_BLOCKING_SYNC
_SCHED_MASK = 0x07


def set_cuda_wait(mode: str) -> str:
    """Ask every GPU's primary context to wait in `mode`. Returns what took effect: `mode`, or a one-line
    reason it could not (no driver; the context already existed with other flags)."""
    if mode not in MODES:
        raise ValueError(f"cuda wait mode {mode!r}: one of {', '.join(MODES)}")
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no CUDA driver"
    if cuda.cuInit(0) != 0:
        return "cuInit failed"
    count = ctypes.c_int()
    cuda.cuDeviceGetCount(ctypes.byref(count))
    for ordinal in range(count.value):
        device = ctypes.c_int()
        cuda.cuDeviceGet(ctypes.byref(device), ordinal)
        flags, active = ctypes.c_uint(), ctypes.c_int()
        cuda.cuDevicePrimaryCtxGetState(device, ctypes.byref(flags), ctypes.byref(active))
        if flags.value & _SCHED_MASK == _FLAGS[mode]:
            continue
        if active.value:
            return f"GPU {ordinal}'s context already exists (flags {flags.value:#x}): set before the first CUDA call"
        if cuda.cuDevicePrimaryCtxSetFlags_v2(device, (flags.value & ~_SCHED_MASK) | _FLAGS[mode]) != 0:
            return f"cuDevicePrimaryCtxSetFlags failed on GPU {ordinal}"
    return mode
