import sys

from rtloop.cli import main

sys.exit(main())
