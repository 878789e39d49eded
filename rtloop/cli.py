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
    "run": ("rtloop.commands.run", "run a policy against LIBERO in closed loop, in real time"),
    "bench": ("rtloop.commands.bench", "time predict_action per stage for each inference engine"),
    "profile": ("rtloop.commands.profile", "run `rtloop run` under py-spy and the torch profiler"),
    "checkpoint": ("rtloop.commands.checkpoint", "make or inspect OpenVLA checkpoint directories"),
"serve": ("rtloop.serve.command", "serve OpenVLA over openpi's websocket protocol"),
    "sweep": ("rtloop.eval.sweep_command", "success rate against latency: a grid of episodes in worker processes"),
    "eval": ("rtloop.eval.eval_command", "a suite's success rate per task, the official protocol in one command"),
    "timeline": ("rtloop.runtime.timeline", "draw one episode of a trace: frames, inferences, ticks, action age"),
}


class Parser(argparse.ArgumentParser):
    """Bad options are bad input like any other: one line, exit 2 (the usage is one --help away)."""

    def error(self, message: str):
        self.exit(2, f"rtloop: error: {message} (see `{self.prog} --help`)\n")


def _no_abbreviations(parser: argparse.ArgumentParser) -> None:
    """argparse reads an unknown option that prefixes a known one as that option (`--policy` as
    `--policy-process`): turned off here for a command's parser and every subparser it made, so a module
    added to SUBCOMMANDS gets it without asking."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _no_abbreviations(sub)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """All subcommands are listed; only `command`'s module is imported, so one subcommand's
    dependencies never stand in the way of another's."""
    parser = Parser(prog="rtloop", description=__doc__.splitlines()[0], allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        if name == command:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(_main=module.main)
    _no_abbreviations(parser)
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
