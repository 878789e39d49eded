"""`rtloop bench`: the command around rtloop.bench (options, the measurement and its report live there). It
resolves the device with the one resolver and checks the output path before the model loads, so neither
fails after minutes of measuring."""

from __future__ import annotations

import argparse

from rtloop.bench import add_arguments

__all__ = ["add_arguments", "main"]


def main(args: argparse.Namespace) -> int:
    from rtloop import bench
    from rtloop.commands.device import resolve_device
    from rtloop.commands.paths import check_writable

    args.device = resolve_device(args.device)
    if args.out is not None:
        out = args.out.with_suffix("") if args.out.suffix == ".json" else args.out
        for suffix in (".json", ".md"):
            check_writable(out.with_suffix(suffix), "--out")
    return bench.main(args)
