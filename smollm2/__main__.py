"""``python -m kdtune.smollm2 ...``: see :mod:`kdtune.smollm2.cli`."""

import sys

from kdtune.smollm2.cli import main

sys.exit(main(sys.argv[1:]))
