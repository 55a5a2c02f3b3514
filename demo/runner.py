"""Run the KD recipe in this process, the way ``kdtune run knowledge_distillation`` would.

The config is loaded exactly as the command line loads it (:func:`kdtune.cli.registry.load_config`:
the YAML merged with ``key=value`` overrides), then the recipe class runs setup, train and
cleanup. In-process runs save the few seconds of imports a fresh ``kdtune run`` pays, which
matters when the demo trains six students on 2 cores.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from kdtune.training.checkpoint.layout import MODEL_DIRNAME, latest_checkpoint
from kdtune.training.config.loading import load_config, resolve_config
from kdtune.training.metrics import METRICS_FILENAME

_TORCHTUNE_LOGGER = "torchtune.utils._logging"
RECIPE_LOG = "recipe.log"


def demo_config(name_or_path: str, overrides: list[str]) -> DictConfig:
    """A shipped config (``demo/student_kd``) or YAML path, merged with ``key=value`` overrides."""
    return load_config(resolve_config(name_or_path), overrides)


@contextlib.contextmanager
def recipe_output_to(log_path: Path) -> Iterator[None]:
    """Send one run's console output (torchtune's logs, progress bars, prints) to ``log_path``.

    The demo prints one line per run instead; the full output stays in the run's folder.
    """
    logger = logging.getLogger(_TORCHTUNE_LOGGER)
    level, handlers, propagate = logger.level, list(logger.handlers), logger.propagate
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as stream, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        file_handler = logging.StreamHandler(stream)
        logger.handlers = [file_handler]
        logger.propagate = False
        try:
            with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
                yield
        finally:
            logger.handlers, logger.propagate = handlers, propagate
            logger.setLevel(level)


@dataclass(frozen=True)
class RunResult:
    output_dir: Path
    checkpoint: Path  # the final checkpoint's model/ folder (HF weights + config.json)
    steps: int
    seconds: float
    final_loss: float


def read_metrics(output_dir: str | Path, kind: str = "train") -> list[dict]:
    """The run's ``metrics.jsonl`` records of one kind (``train`` or ``val``), in order."""
    lines = (Path(output_dir) / METRICS_FILENAME).read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def run_recipe(cfg: DictConfig, *, fresh: bool, quiet: bool) -> RunResult:
    """Run the KD recipe on ``cfg`` in this process; returns where its final checkpoint is.

    ``fresh`` deletes ``cfg.output_dir`` first, so an earlier run's metrics and checkpoints
    never mix with this one's. ``quiet`` sends the recipe's console output to
    ``<output_dir>/recipe.log``.
    """
    # Imported first: its modules set torchtune's logger up at import time.
    from kdtune.recipes.knowledge_distillation import KDRecipe

    output_dir = Path(cfg.output_dir)
    if fresh:
        shutil.rmtree(output_dir, ignore_errors=True)
    started = time.perf_counter()
    quiet_context = recipe_output_to(output_dir / RECIPE_LOG) if quiet else contextlib.nullcontext()
    with quiet_context:
        recipe = KDRecipe(cfg=cfg)
        recipe.setup(cfg=cfg)
        recipe.train()
        recipe.cleanup()
    seconds = time.perf_counter() - started
    checkpoint = latest_checkpoint(output_dir)
    if checkpoint is None:
        raise RuntimeError(f"the run wrote no checkpoint under {output_dir}")
    train = read_metrics(output_dir)
    return RunResult(
        output_dir, checkpoint / MODEL_DIRNAME, len(train), seconds, float(train[-1]["loss"])
    )
