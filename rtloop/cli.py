"""`rtloop` command line: one subcommand per concern, each implemented in its own module.

Each module named in SUBCOMMANDS exposes `add_arguments(parser)` and `main(args) -> int`, and keeps its
heavy imports (torch, LIBERO) inside functions so `rtloop --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from rtloop.errors import RtloopError

SUBCOMMANDS = {
    "run": ("rtloop.runtime.command", "run OpenVLA against LIBERO in closed loop, in real time"),
    "bench": ("rtloop.bench", "time predict_action per stage for each inference engine"),
    "profile": ("rtloop.profiling.command", "run `rtloop run` under py-spy and the torch profiler"),
    "checkpoint": ("rtloop.policy.checkpoint_command", "make or inspect OpenVLA checkpoint directories"),
    "serve": ("rtloop.serve.command", "serve OpenVLA over openpi's websocket protocol"),
    "sweep": ("rtloop.eval.sweep_command", "success rate against latency: a grid of episodes in worker processes"),
    "eval": ("rtloop.eval.eval_command", "a suite's success rate per task, the official protocol in one command"),
    "timeline": ("rtloop.runtime.timeline", "draw one episode of a trace: frames, inferences, ticks, action age"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """All subcommands are listed; only `command`'s module is imported, so one subcommand's
    dependencies never stand in the way of another's."""
    parser = argparse.ArgumentParser(prog="rtloop", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(_main=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    try:
        return int(args._main(args) or 0)
    except RtloopError as e:
        print(f"rtloop: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rtloop: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
