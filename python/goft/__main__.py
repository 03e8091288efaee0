"""`python -m goft ...`: the same command line as the `goft` console script."""

import sys

from goft.cli import main

if __name__ == "__main__":
    sys.exit(main())
