"""Run several KD recipe configs one after another in ONE torchrun launch (each launch costs
seconds of imports on every process).

Usage (from the repository root)::

    python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        tests/dist_workers/recipe_runs.py --runs runs.json

``runs.json`` is a list of ``{"config": "<shipped name or YAML path>", "overrides": [...]}``.
Each config is loaded exactly as ``kdtune run`` loads it and run through the recipe class
(setup, train, cleanup), as ``recipe_main`` does; the process group is started by the first
recipe and ended (barrier, then destroy) once all runs are done. Each run writes its own
``output_dir``; the tests read the metrics and checkpoints there. A run with
``"count_gradient_reductions": true`` also writes ``gradient_reductions.json`` there: per
micro-batch (in order), how many FSDP2 gradient reductions (``foreach_reduce``: reduce-scatter
of one parameter group) its backward ran.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from kdtune.recipes.knowledge_distillation import KDRecipe
from kdtune.training import console, process_group
from kdtune.training.config.loading import load_config, resolve_config


def count_gradient_reductions(recipe: KDRecipe) -> list[int]:
    """A list that fills, during training, with each micro-batch's gradient reductions.

    A micro-batch's backward runs after its loss-step call and before the next one's, so a
    count opened at each loss-step call collects exactly that micro-batch's reductions.
    """
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group

    counts: list[int] = []
    reduce = _fsdp_param_group.foreach_reduce
    loss_step = recipe._loss_step

    def counted_reduce(*args, **kwargs):
        counts[-1] += 1
        return reduce(*args, **kwargs)

    def counted_loss_step(*args, **kwargs):
        counts.append(0)
        return loss_step(*args, **kwargs)

    _fsdp_param_group.foreach_reduce = counted_reduce
    recipe._loss_step = counted_loss_step
    return counts


def run_one(config: str, overrides: list[str], count_reductions: bool = False) -> None:
    cfg = load_config(resolve_config(config), overrides)
    recipe = KDRecipe(cfg=cfg)
    recipe.setup(cfg=cfg)
    counts = count_gradient_reductions(recipe) if count_reductions else None
    recipe.train()
    recipe.cleanup()
    if counts is not None and torch.distributed.get_rank() == 0:
        (Path(cfg.output_dir) / "gradient_reductions.json").write_text(json.dumps(counts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=Path, required=True, help="JSON list of runs")
    args = parser.parse_args()
    for run in json.loads(args.runs.read_text()):
        run_one(run["config"], run["overrides"], run.get("count_gradient_reductions", False))
    process_group.teardown()


if __name__ == "__main__":
    main()
    console.exit_recipe(0)  # as the recipe ends: no interpreter teardown after the group
