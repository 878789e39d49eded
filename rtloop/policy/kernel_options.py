"""`KernelOptions`: how the compiled engine's kernels run, as engine options and command-line flags.

Kept apart from rtloop.policy.kernels (Triton, torch at import) so that the commands can add the flags
without importing either. Nothing here is read from the environment.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace

FIXED_TILE = (2, 1024, 4, 0)  # (BLOCK_N, BLOCK_K, num_warps, ROW_SUMS) of the GEMV when not autotuning
ARCHS = {"sm80": 80, "sm86": 86, "sm89": 89, "sm90": 90, "sm100": 100, "sm120": 120}  # --kernel-arch values


@dataclass(frozen=True)
class KernelOptions:
    """How the compiled engine's kernels run. Build one with the wanted switches, then `resolve(device)`.

    - autotune: time the GEMV's ~40 tiles per (shape, dtypes, flags) on first use, and time each ~288-row
      fp8 prefill GEMM whole against split; False: FIXED_TILE, and split wherever `prefill_split` says
      (the test suite passes False: it checks results, and tuning made a GPU test file take minutes).
    - pdl: programmatic dependent launch of the decode kernels; None: where the architecture has it (sm90+).
    - prefill_split: allow a ~288-row fp8 prefill GEMM to run its last rows on a side stream.
    - arch: the architecture whose code paths to take, e.g. "sm89" (the RTX 4090's: no PDL, fp8 scaled
      per tensor) on an H100/H200; None: the device's own. An architecture newer than the device is refused.
    After `resolve`, `pdl` is a bool and `sm` the architecture number (None on the CPU)."""

    autotune: bool = True
    pdl: bool | None = None
    prefill_split: bool = True
    arch: str | None = None
    sm: int | None = None
    tile: tuple[int, int, int, int] = FIXED_TILE  # (BLOCK_N, BLOCK_K, num_warps, ROW_SUMS) when not autotuning
    int8_bits: bool = True  # widen int8 weights by float bit arithmetic, not the conversion instruction

    def resolve(self, device) -> KernelOptions:
        """The options with every choice made for `device` (a one-line ValueError for an impossible one)."""
        import torch

        device = torch.device(device)
        own = None
        if device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(device)
            own = 10 * major + minor
        if self.arch is not None and self.arch not in ARCHS:
            raise ValueError(f"unknown kernel architecture {self.arch!r}; available: {', '.join(ARCHS)}")
        sm = own if self.arch is None else ARCHS[self.arch]
        if self.arch is not None and (own is None or sm > own):
            where = "a CPU" if own is None else f"sm{own}"
            raise ValueError(f"kernel architecture {self.arch} cannot be forced on {where}: only an older "
                             "architecture's code paths run on a newer GPU")
        has_pdl = sm is not None and sm >= 90
        if self.pdl and not has_pdl:
            raise ValueError(f"PDL needs sm90 or newer; the kernels run as {'CPU' if sm is None else f'sm{sm}'}")
        return replace(self, sm=sm, pdl=has_pdl if self.pdl is None else self.pdl)

    @property
    def rowwise_fp8(self) -> bool:
        """fp8 prefill with one activation scale per row (torch._scaled_mm row-wise: Hopper and newer, and
        the CPU); else one per tensor, as Ada (sm89) offers."""
        return self.sm is None or self.sm >= 90


def add_kernel_arguments(p: argparse.ArgumentParser) -> None:
    """The compiled engine's kernel flags, shared by `rtloop bench` and `rtloop run`."""
    p.add_argument("--kernel-arch", choices=list(ARCHS), default=None,
                   help="take this GPU architecture's kernel code paths, e.g. sm89 (RTX 4090: no PDL, fp8 scaled "
                        "per tensor) on an H100/H200 (default: the device's own)")
    p.add_argument("--no-autotune", action="store_true",
                   help="one fixed GEMV tile and no split timing, instead of tuning per shape on first use")
    p.add_argument("--no-pdl", action="store_true", help="launch the decode kernels plainly, without PDL")
    p.add_argument("--no-prefill-split", action="store_true",
                   help="run every 8-bit prefill GEMM whole (never its last rows on a side stream)")


def kernel_options_from_args(args: argparse.Namespace) -> KernelOptions:
    return KernelOptions(autotune=not args.no_autotune, pdl=False if args.no_pdl else None,
                         prefill_split=not args.no_prefill_split, arch=args.kernel_arch)
