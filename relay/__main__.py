"""`python -m relay` is the `relay` command."""

import sys

from relay.cli import main

if __name__ == "__main__":  # not when a worker process (relay.workers) imports it
    sys.exit(main())
