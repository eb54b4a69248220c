"""`python -m m3ae_engine.convert ...`: the converter's command line, m3ae_engine/interop/cli.py."""
import sys

from .interop.cli import main

if __name__ == "__main__":
    sys.exit(main())
