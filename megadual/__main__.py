"""`python -m megadual ...` is the `megadual` command."""

import sys

from megadual.cli import main

if __name__ == "__main__":
    sys.exit(main())
