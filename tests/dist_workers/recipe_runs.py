"""Run several KD recipe configs one after another in ONE torchrun launch (each launch costs
seconds of imports on every process).

Usage (from the repository root)::

    python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        tests/dist_workers/recipe_runs.py --runs runs.json

``runs.json`` is a list of ``{"config": "<shipped name or YAML path>", "overrides": [...]}``.
Each config is loaded exactly as ``kdtune run`` loads it and run through the recipe class
(setup, train, cleanup), as ``recipe_main`` does; the process group is started by the first
recipe and ended (barrier, then destroy) once all runs are done. Each run writes its own
``output_dir``; the tests read the metrics and checkpoints there.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kdtune.cli.registry import load_config, resolve_config
from kdtune.recipes.knowledge_distillation import KDRecipe
from kdtune.training import distributed


def run_one(config: str, overrides: list[str]) -> None:
    cfg = load_config(resolve_config(config), overrides)
    recipe = KDRecipe(cfg=cfg)
    recipe.setup(cfg=cfg)
    recipe.train()
    recipe.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=Path, required=True, help="JSON list of runs")
    args = parser.parse_args()
    for run in json.loads(args.runs.read_text()):
        run_one(run["config"], run["overrides"])
    distributed.teardown()


if __name__ == "__main__":
    main()
