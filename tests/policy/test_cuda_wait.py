import subprocess
import sys

import pytest
import torch

from rtloop.policy.cuda_wait import set_cuda_wait


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="blocking, spin"):
        set_cuda_wait("yield")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-driver answer is for machines without CUDA")
def test_without_a_driver_it_says_so():
    assert set_cuda_wait("blocking") == "no CUDA driver"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_primary_context_waits_as_asked():
    """In a fresh process (the flag must be set before the context exists): set, make the context through
    torch, read the flag back from the driver; and once the context exists, another mode is refused."""
    code = """
import ctypes, torch
from rtloop.policy.cuda_wait import set_cuda_wait
print(set_cuda_wait("blocking"))
torch.ones(1, device="cuda").sum().item()
cuda = ctypes.CDLL("libcuda.so.1"); dev = ctypes.c_int(); cuda.cuDeviceGet(ctypes.byref(dev), 0)
flags, active = ctypes.c_uint(), ctypes.c_int()
cuda.cuDevicePrimaryCtxGetState(dev, ctypes.byref(flags), ctypes.byref(active))
print(flags.value & 7, active.value)
print(set_cuda_wait("spin"))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "blocking" and out[1] == "4 1" and "already exists" in out[2]
