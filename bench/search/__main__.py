"""`python -m bench.search SPACE ...`: the command line of bench.search.cli."""
import sys

from bench.search.cli import main

if __name__ == "__main__":
    sys.exit(main())
