"""Build a teacher cache with every torchrun process, then run KD recipes from it, in ONE launch.

Usage (from the repository root)::

    python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        tests/dist_workers/teacher_cache_runs.py --build build.json --runs runs.json

``build.json`` is ``{"config": ..., "overrides": [...], "options": {BuildOptions fields}}``
(each rank builds its own shards; rank 0 writes the manifest); ``runs.json`` as for
``recipe_runs.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from kdtune.teacher_cache.build import BuildOptions, build_teacher_cache
from kdtune.teacher_cache.manifest import MANIFEST
from kdtune.training import console, process_group
from kdtune.training.config.loading import load_config, resolve_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipe_runs import run_one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--build", type=Path, required=True, help="JSON: the cache to build")
    parser.add_argument("--runs", type=Path, required=True, help="JSON list of runs")
    args = parser.parse_args()
    build = json.loads(args.build.read_text())
    cfg = load_config(resolve_config(build["config"]), build["overrides"])
    build_teacher_cache(cfg, BuildOptions(**build["options"]))
    while not (Path(str(cfg.teacher_cache)) / MANIFEST).is_file():  # rank 0 writes it last
        time.sleep(0.1)
    for run in json.loads(args.runs.read_text()):
        run_one(run["config"], run["overrides"])
    process_group.teardown()


if __name__ == "__main__":
    main()
    console.exit_recipe(0)  # as the recipe ends: no interpreter teardown after the group
