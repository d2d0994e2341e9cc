"""`python -m bitmix ...`: the same command as the `bitmix` script."""

import sys

from bitmix.cli import main

sys.exit(main())
