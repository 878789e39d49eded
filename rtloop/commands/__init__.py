"""The `rtloop` subcommands, one module each (listed in rtloop.cli.SUBCOMMANDS), and what they share: the one
device resolver (device.py) and the one policy factory (policies.py).

A command module exposes `add_arguments(parser)` and `main(args) -> int` and keeps its heavy imports (torch,
LIBERO) inside functions, so `rtloop --help` and bad-input errors stay fast.
"""
