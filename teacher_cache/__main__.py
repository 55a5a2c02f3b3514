"""``python -m kdtune.teacher_cache``: build a teacher cache (what ``kdtune cache-teacher`` runs)."""

import sys

from kdtune.teacher_cache.build import main

if __name__ == "__main__":
    sys.exit(main())
