"""The one device resolver: `--device` of every command means the same thing and fails the same way."""

from __future__ import annotations

import re

from rtloop.errors import InputError

_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def resolve_device(arg: str) -> str:
    """auto -> cuda when CUDA is available, else cpu; cpu, cuda and cuda:N are checked against this machine.
    Anything else, or CUDA where there is none, is a one-line InputError."""
    if not _DEVICE.fullmatch(arg):
        raise InputError(f"--device {arg!r}: expected auto, cpu, cuda or cuda:N")
    if arg == "cpu":
        return arg
    import torch  # only here: `--device cpu` and the string check need no torch

    if arg == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise InputError(f"--device {arg}: CUDA is not available on this machine")
    index = int(arg.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise InputError(f"--device {arg}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return arg
