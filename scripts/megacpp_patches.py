"""Thin wrapper: ``python scripts/megacpp_patches.py status|apply [...]`` == ``megacpp-mcore patches ...``."""

import sys

from megacpp_mcore.cli import main

if __name__ == "__main__":
    sys.exit(main(["patches", *sys.argv[1:]]))
