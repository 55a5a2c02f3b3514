"""``python -m kdtune.demo [args]``: the same as ``kdtune demo [args]``."""

from __future__ import annotations

import sys

from kdtune.demo.cli import demo_main

if __name__ == "__main__":
    sys.exit(demo_main(sys.argv[1:]))
