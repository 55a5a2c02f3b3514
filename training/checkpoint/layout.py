"""Step checkpoints: the folder layout, its names, and the cheap checks of a saved folder.

Saving is :mod:`~kdtune.training.checkpoint.save`, resuming
:mod:`~kdtune.training.checkpoint.resume`; this module is what both (and the guard, the demo
and the evaluation tools) read.

Layout under ``<output_dir>/checkpoints/``::

    step_0000008/
        model/                 the student as a Hugging Face model folder (merged weights for
                               LoRA/DoRA; absent with save_adapter_weights_only: true):
            model-00001-of-00001.safetensors, model.safetensors.index.json
            config.json, ...   other files of the student's checkpoint_dir (tokenizer, ...)
        adapter/               LoRA/DoRA students: a PEFT adapter folder
            adapter_model.safetensors, adapter_config.json    (PEFT keys, base = checkpoint_dir)
            adapter_model.pt   the same adapters in torchtune's keys (what resume reads)
        training_state.pt      optimizer (keyed by parameter name), data-loader position,
                               every rank's RNG states, progress
        manifest.json          written last: a folder without it is incomplete. Lists every
                               file with its size and SHA-256, the run's ``fingerprints``
                               (:mod:`~kdtune.training.checkpoint.fingerprints`), and the
                               lineage: ``run_id`` (one per launch), ``parent`` (the
                               checkpoint the launch resumed from, or null), ``save_seq``
                               (1, 2, ... over the output folder) and ``saved_at``

Saving (rank 0; :func:`save_checkpoint_folder`): the checkpoint is assembled in
``.staging_step_N/``, every file and folder of it is fsynced, the manifest is written, and
the folder is renamed into place (then the parent folder is fsynced). Saving a step that
already exists renames the old folder to ``.aside_step_N``, renames the new one in, and only
then deletes the old one. A save killed at any point leaves every earlier checkpoint loadable:
the next launch deletes leftover staging folders and moves an aside folder back when its
replacement is not in place (:func:`recover_interrupted_saves`). A failed write (disk full or
another ``OSError``) deletes the staging folder and says so (:class:`CheckpointSaveError`).

Resuming (``resume_from_checkpoint``): ``true`` continues the most recently *saved* checkpoint
(highest ``save_seq``; manifests from before lineage count as one branch ordered by step), so
after resuming from an earlier step the new branch is continued, not the abandoned one. A
checkpoint that fails cheap checks (manifest, file sizes, safetensors headers) or whose
training state does not load is skipped for the previous one of its branch (its run's earlier
saves, then its parent's), with a warning naming both; pruning keeps that branch. An
explicit folder must pass the same checks; resuming from it warns about the later checkpoints
it abandons. ``model/`` and ``adapter/`` are written by :mod:`kdtune.training.checkpoint.hf_export` (model
weights by torchtune's ``FullModelHFCheckpointer``, which loads them back). In a multi-process
run the caller gathers the full state on rank 0, which alone writes.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from safetensors import safe_open
from torchtune import utils

log = utils.get_logger("INFO")

CHECKPOINTS_DIRNAME = "checkpoints"
MANIFEST_FILENAME = "manifest.json"
TRAINING_STATE_FILENAME = "training_state.pt"
ADAPTER_FILENAME = "adapter_model.pt"
"""The adapters in torchtune's keys, in ``adapter/`` beside the PEFT files (resume reads it)."""
MODEL_DIRNAME = "model"
"""Subfolder of a step checkpoint: the student as a Hugging Face model folder (issue 11 layout:
``step_N/{model/, adapter/, training_state.pt, manifest.json}``)."""
ADAPTER_DIRNAME = "adapter"
"""Subfolder of a LoRA/DoRA student's step checkpoint: the PEFT adapter folder."""
_STEP_DIR = re.compile(r"^step_(\d+)$")
STAGING_PREFIX = ".staging_"
"""A checkpoint being written: ``.staging_step_N`` (deleted if a save dies)."""
ASIDE_PREFIX = ".aside_"
"""An older ``step_N`` while a new save of the same step is renamed into place."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the folder and the problem."""


class CheckpointSaveError(OSError):
    """Writing a checkpoint failed (``errno`` is the cause's; ``ENOSPC`` for a full disk); the
    staging folder is deleted and earlier checkpoints are intact."""


def checkpoints_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS_DIRNAME


def step_dirname(step: int) -> str:
    return f"step_{step:07d}"


def is_complete(folder: Path) -> bool:
    """A checkpoint folder is complete once its manifest exists (it is written last)."""
    return (folder / MANIFEST_FILENAME).is_file()


def checkpoint_step(folder: Path) -> int | None:
    """The step of ``step_N`` or of an aside ``.aside_step_N`` folder, else None."""
    match = _STEP_DIR.match(folder.name.removeprefix(ASIDE_PREFIX))
    return int(match.group(1)) if match else None


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders, oldest step first.

    An aside folder (``.aside_step_N``, left by a save killed between its two renames) stands
    in for ``step_N`` while no complete ``step_N`` exists; the next launch moves it back.
    """
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    found: dict[int, Path] = {}
    for folder in root.iterdir():
        step = checkpoint_step(folder)
        if step is None or not folder.is_dir() or not is_complete(folder):
            continue
        if folder.name.startswith(ASIDE_PREFIX) and is_complete(root / step_dirname(step)):
            continue  # its replacement is in place: the aside copy is stale
        found[step] = folder
    return [found[step] for step in sorted(found)]


def read_manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / MANIFEST_FILENAME).read_text())


def manifest_or_none(folder: Path) -> dict[str, Any] | None:
    try:
        manifest = read_manifest(folder)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def save_order_key(folder: Path) -> tuple[float, int]:
    """Later saves sort later: ``save_seq`` (0 in manifests from before lineage, which then
    count as one branch ordered by step), then the step. An unreadable manifest sorts as the
    newest, so that resuming tries it first and reports it."""
    manifest = manifest_or_none(folder)
    seq = manifest.get("save_seq", 0) if manifest is not None else math.inf
    return (seq if isinstance(seq, int | float) else 0, checkpoint_step(folder) or 0)


def checkpoints_by_save_order(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, the most recently saved last (see :func:`save_order_key`)."""
    return sorted(complete_checkpoints(output_dir), key=save_order_key)


def _safetensors_problem(path: Path) -> str | None:
    """None if the file's header parses and covers the file (safetensors checks both)."""
    try:
        with safe_open(path, framework="pt"):
            return None
    except Exception as error:  # SafetensorError, OSError: any of them makes the file unusable
        return f"is not a readable safetensors file ({error})"


def checkpoint_problem(folder: Path) -> str | None:
    """What makes ``folder`` unusable, found without reading tensors, or None.

    Checks: the manifest is a JSON object; every file it lists exists with the listed size
    (manifests from before sizes were recorded: exists); every safetensors file's header
    parses and covers the file (a truncated file fails).
    """
    try:
        manifest = read_manifest(folder)
    except FileNotFoundError:
        return f"no {MANIFEST_FILENAME} (the save did not finish)"
    except (OSError, ValueError) as error:
        return f"{MANIFEST_FILENAME} is not valid JSON ({error})"
    if not isinstance(manifest, dict):
        return f"{MANIFEST_FILENAME} is not a JSON object"
    sizes = manifest.get("file_sizes")
    expected = sizes if isinstance(sizes, dict) else dict.fromkeys(manifest.get("files", []))
    for name, size in expected.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if size is not None and path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {size}"
    for path in sorted(folder.rglob("*.safetensors")):
        problem = _safetensors_problem(path)
        if problem is not None:
            return f"{path.relative_to(folder)} {problem}"
    return None


def hf_weight_files(folder: Path) -> list[str]:
    """The safetensors shards of a Hugging Face model folder (a checkpoint's ``model/``), from
    its index file."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return sorted(set(index["weight_map"].values()))


# --------------------------------------------------------------------------------------------
# Resume bookkeeping
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Assembling a checkpoint: LoRA merge, training state, manifest
# --------------------------------------------------------------------------------------------


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The most recently saved complete checkpoint under ``output_dir`` (not checked), or None."""
    folders = checkpoints_by_save_order(output_dir)
    return folders[-1] if folders else None


def _branch_ancestors(head: Path, newest_first: list[Path]) -> list[Path]:
    """The checkpoints ``head`` descends from, newest first: earlier saves of its run, then
    its run's parent checkpoint and the saves of that run up to it, and so on. Manifests
    without lineage form one run (``run_id`` None) ordered by step."""
    manifests = {folder: manifest_or_none(folder) for folder in newest_first}
    run_id, bound, inclusive = manifests[head].get("run_id"), save_order_key(head), False
    parent = manifests[head].get("parent")
    ancestors: list[Path] = []
    seen_runs = set()
    while run_id not in seen_runs:
        seen_runs.add(run_id)
        ancestors += [
            folder
            for folder in newest_first
            if manifests[folder] is not None
            and manifests[folder].get("run_id") == run_id
            and (save_order_key(folder) <= bound if inclusive else save_order_key(folder) < bound)
        ]
        if not isinstance(parent, dict):
            break
        run_id, inclusive = parent.get("run_id"), True
        bound = (parent.get("save_seq", 0), parent.get("step", 0))
        parent = next(
            (m.get("parent") for m in manifests.values() if m and m.get("run_id") == run_id), None
        )
    return [folder for folder in ancestors if folder != head]


def resume_order(output_dir: str | Path) -> list[Path]:
    """The checkpoints ``resume_from_checkpoint = true`` tries, in order: the most recently
    saved, then the ones it descends from (:func:`_branch_ancestors`), never a checkpoint of
    an abandoned branch. Newer checkpoints with unreadable manifests come first (to be
    reported)."""
    newest_first = list(reversed(checkpoints_by_save_order(output_dir)))
    for index, head in enumerate(newest_first):
        if manifest_or_none(head) is not None:
            return newest_first[: index + 1] + _branch_ancestors(head, newest_first)
    return newest_first


def resume_candidate(output_dir: str | Path) -> Path | None:
    """The checkpoint ``resume_from_checkpoint = true`` would resume from, as far as cheap
    checks tell (:func:`checkpoint_problem`; the training state is not loaded), or None."""
    return next((f for f in resume_order(output_dir) if checkpoint_problem(f) is None), None)
