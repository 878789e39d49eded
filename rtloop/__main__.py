import sys

from rtloop.cli import main

if __name__ == "__main__":  # spawned child processes (--policy-process) import this module as __mp_main__
    sys.exit(main())
