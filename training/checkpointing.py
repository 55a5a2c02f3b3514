"""Step checkpoints: Hugging Face weights plus the training state, durable and with a lineage.

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
                               file with its size, and the lineage: ``run_id`` (one per
                               launch), ``parent`` (the checkpoint the launch resumed from, or
                               null), ``save_seq`` (1, 2, ... over the output folder) and
                               ``saved_at``

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
it abandons. ``model/`` and ``adapter/`` are written by :mod:`kdtune.training.hf_export` (model
weights by torchtune's ``FullModelHFCheckpointer``, which loads them back). In a multi-process
run the caller gathers the full state on rank 0, which alone writes.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import re
import secrets
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor, nn
from torchtune import config, training, utils
from torchtune.modules.peft import get_adapter_state_dict, get_merged_lora_ckpt

from kdtune.training import hf_export, process_group
from kdtune.training.runtime import adapter_parameter_names, student_state_dict

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
LOW_SPACE_BYTES = 64 * 2**20
"""A failed write with less free space than this is reported as a full disk (``torch.save``
and safetensors do not always raise ``ENOSPC`` themselves)."""
_TRAINING_STATE_KEYS = ("optimizer", "dataloader", "rng", "run", "progress")


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


def _checkpoint_step(folder: Path) -> int | None:
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
        step = _checkpoint_step(folder)
        if step is None or not folder.is_dir() or not is_complete(folder):
            continue
        if folder.name.startswith(ASIDE_PREFIX) and is_complete(root / step_dirname(step)):
            continue  # its replacement is in place: the aside copy is stale
        found[step] = folder
    return [found[step] for step in sorted(found)]


def read_manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / MANIFEST_FILENAME).read_text())


def _manifest_or_none(folder: Path) -> dict[str, Any] | None:
    try:
        manifest = read_manifest(folder)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _save_order_key(folder: Path) -> tuple[float, int]:
    """Later saves sort later: ``save_seq`` (0 in manifests from before lineage, which then
    count as one branch ordered by step), then the step. An unreadable manifest sorts as the
    newest, so that resuming tries it first and reports it."""
    manifest = _manifest_or_none(folder)
    seq = manifest.get("save_seq", 0) if manifest is not None else math.inf
    return (seq if isinstance(seq, int | float) else 0, _checkpoint_step(folder) or 0)


def checkpoints_by_save_order(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, the most recently saved last (see :func:`_save_order_key`)."""
    return sorted(complete_checkpoints(output_dir), key=_save_order_key)


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


def load_training_state(folder: Path) -> dict[str, Any]:
    """The training state of a checkpoint (our own file: RNG states need full unpickling)."""
    return torch.load(folder / TRAINING_STATE_FILENAME, map_location="cpu", weights_only=False)


def load_checked_training_state(folder: Path) -> dict[str, Any]:
    """The training state of ``folder`` once the folder passes :func:`checkpoint_problem`.

    Raises:
        CheckpointError: naming ``folder`` and what is wrong with it.
    """
    problem = checkpoint_problem(folder)
    if problem is None:
        try:
            state = load_training_state(folder)
        except Exception as error:  # a truncated or foreign file fails in many ways
            first_line = str(error).splitlines()[0] if str(error) else ""
            problem = (
                f"{TRAINING_STATE_FILENAME} does not load ({type(error).__name__}: {first_line})"
            )
        else:
            missing = [
                key
                for key in _TRAINING_STATE_KEYS
                if not isinstance(state, dict) or key not in state
            ]
            if not missing:
                return state
            problem = f"{TRAINING_STATE_FILENAME} lacks {', '.join(missing)}"
    raise CheckpointError(f"checkpoint {folder} cannot be resumed from: {problem}")


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The most recently saved complete checkpoint under ``output_dir`` (not checked), or None."""
    folders = checkpoints_by_save_order(output_dir)
    return folders[-1] if folders else None


def _branch_ancestors(head: Path, newest_first: list[Path]) -> list[Path]:
    """The checkpoints ``head`` descends from, newest first: earlier saves of its run, then
    its run's parent checkpoint and the saves of that run up to it, and so on. Manifests
    without lineage form one run (``run_id`` None) ordered by step."""
    manifests = {folder: _manifest_or_none(folder) for folder in newest_first}
    run_id, bound, inclusive = manifests[head].get("run_id"), _save_order_key(head), False
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
            and (_save_order_key(folder) <= bound if inclusive else _save_order_key(folder) < bound)
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
        if _manifest_or_none(head) is not None:
            return newest_first[: index + 1] + _branch_ancestors(head, newest_first)
    return newest_first


def resume_candidate(output_dir: str | Path) -> Path | None:
    """The checkpoint ``resume_from_checkpoint = true`` would resume from, as far as cheap
    checks tell (:func:`checkpoint_problem`; the training state is not loaded), or None."""
    return next((f for f in resume_order(output_dir) if checkpoint_problem(f) is None), None)


def _latest_resumable(output_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    """The first checkpoint of :func:`resume_order` that loads, and its training state; a
    newer one that does not is skipped with a warning naming both."""
    folders = resume_order(output_dir)
    if not folders:
        raise CheckpointError(
            f"resume_from_checkpoint = true but {checkpoints_root(output_dir)} holds no "
            "complete checkpoint (a folder step_N with manifest.json): set it to false "
            "for a fresh run, or point output_dir at the earlier run"
        )
    skipped: list[str] = []
    for folder in folders:
        try:
            state = load_checked_training_state(folder)
        except CheckpointError as error:
            skipped.append(str(error))
            continue
        if skipped:
            warnings.warn(
                f"{'; '.join(skipped)}; falling back to the previous checkpoint {folder}",
                stacklevel=3,
            )
        return folder, state
    raise CheckpointError(
        f"resume_from_checkpoint = true but no checkpoint of the branch trained last under "
        f"{checkpoints_root(output_dir)} can be resumed from: {'; '.join(skipped)}; give "
        "resume_from_checkpoint a step_N folder to resume from, or set it to false and use "
        "another output_dir"
    )


def abandoned_checkpoints(output_dir: str | Path, folder: Path) -> list[Path]:
    """The checkpoints of ``output_dir`` that resuming from ``folder`` leaves behind: those at
    later steps, and (``folder`` in the same run folder) those saved after it."""
    chosen = folder.resolve()
    same_root = chosen.parent == checkpoints_root(output_dir).resolve()
    step, key = _checkpoint_step(folder), _save_order_key(folder)
    return [
        other
        for other in complete_checkpoints(output_dir)
        if other.resolve() != chosen
        and (
            (step is not None and (_checkpoint_step(other) or 0) > step)
            or (same_root and _save_order_key(other) > key)
        )
    ]


def resolve_resume(
    output_dir: str | Path, resume_from_checkpoint: bool | str
) -> tuple[Path | None, dict[str, Any] | None]:
    """Which checkpoint to resume from and its training state: ``(None, None)`` for a fresh
    run, the most recently saved loadable one (``true``), or the given folder.

    Raises:
        CheckpointError: ``false`` while ``output_dir`` already holds checkpoints (a later
            resume would mix the two runs), ``true`` with no loadable checkpoint, or a path
            that is not a complete, loadable checkpoint (the message names the problem).
    """
    if resume_from_checkpoint is False:
        existing = complete_checkpoints(output_dir)
        if existing:
            raise CheckpointError(
                f"output_dir {output_dir} already holds checkpoints of an earlier run "
                f"({', '.join(f.name for f in existing)}): continue it with "
                "resume_from_checkpoint=true, or choose another output_dir"
            )
        return None, None
    if resume_from_checkpoint is True:
        return _latest_resumable(output_dir)
    folder = Path(resume_from_checkpoint)
    if not is_complete(folder):
        raise CheckpointError(
            f"resume_from_checkpoint = {resume_from_checkpoint!r} is not a complete checkpoint "
            f"folder (no {MANIFEST_FILENAME}): use true for the latest one or a step_N folder"
        )
    state = load_checked_training_state(folder)
    abandoned = abandoned_checkpoints(output_dir, folder)
    if abandoned:
        warnings.warn(
            f"resuming from {folder} abandons the later checkpoints "
            f"{', '.join(str(f) for f in abandoned)}: once this run saves, "
            "resume_from_checkpoint = true continues this run, and its saves replace folders "
            "of the same step",
            stacklevel=3,
        )
    return folder, state


def new_run_lineage(resume_folder: Path | None) -> dict[str, Any]:
    """This launch's lineage for its manifests: a new ``run_id`` and the ``parent`` checkpoint
    (its folder, run id and step; None for a fresh run)."""
    run_id = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(3)}"
    parent = None
    if resume_folder is not None:
        manifest = _manifest_or_none(resume_folder) or {}
        parent = {
            "folder": str(resume_folder.resolve()),
            "run_id": manifest.get("run_id"),
            "step": manifest.get("step"),
            "save_seq": manifest.get("save_seq", 0),
        }
    return {"run_id": run_id, "parent": parent}


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w") as file:
        json.dump(payload, file, indent=2)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def _torch_save_atomic(payload: Any, path: Path) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    torch.save(payload, temporary)
    os.replace(temporary, path)


def _fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under ``folder`` (whoever wrote them), then ``folder``."""
    for directory, _, files in os.walk(folder, topdown=False):
        for name in files:
            _fsync(Path(directory) / name)
        _fsync(Path(directory))


def _file_sizes(folder: Path) -> dict[str, int]:
    """``{relative path: bytes}`` of every file under ``folder``, the manifest excepted."""
    return {
        path.relative_to(folder).as_posix(): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST_FILENAME
    }


def _next_save_seq(output_dir: str | Path) -> int:
    seqs = [
        manifest.get("save_seq", 0)
        for manifest in map(_manifest_or_none, complete_checkpoints(output_dir))
        if manifest is not None
    ]
    return 1 + max([int(seq) for seq in seqs if isinstance(seq, int | float)], default=0)


def recover_interrupted_saves(output_dir: str | Path) -> None:
    """Clean up after a save that was killed: delete staging folders, and move an aside
    folder back to ``step_N`` when its replacement never arrived (else delete it). Rank 0,
    before it lists or writes checkpoints."""
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return
    for folder in sorted(root.iterdir()):
        if folder.name.startswith(STAGING_PREFIX):
            shutil.rmtree(folder, ignore_errors=True)
        elif folder.name.startswith(ASIDE_PREFIX):
            final = root / folder.name.removeprefix(ASIDE_PREFIX)
            if is_complete(final):
                shutil.rmtree(folder)
            else:
                shutil.rmtree(final, ignore_errors=True)
                os.replace(folder, final)
    _fsync(root)


def _install(staging: Path, final: Path) -> None:
    """Rename the finished ``staging`` folder to ``final``; an existing ``final`` is renamed
    aside first and deleted only once the new folder is in place."""
    root = final.parent
    aside = root / f"{ASIDE_PREFIX}{final.name}"
    if final.exists():
        os.replace(final, aside)
    try:
        os.replace(staging, final)
    except OSError:
        if aside.exists() and not final.exists():
            os.replace(aside, final)
        raise
    _fsync(root)
    if aside.exists():
        shutil.rmtree(aside)


def _free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def _save_error(error: BaseException, root: Path, name: str) -> CheckpointSaveError | None:
    """The error to report for a failed save, or None to re-raise ``error`` as it is."""
    if not isinstance(error, Exception):  # KeyboardInterrupt, SystemExit: not a write error
        return None
    cause = getattr(error, "errno", None)
    if cause == errno.ENOSPC or _free_bytes(root) < LOW_SPACE_BYTES:
        reported = CheckpointSaveError(
            f"disk full while writing checkpoint {name} under {root}; earlier checkpoints are "
            f"intact; free space and resume (resume_from_checkpoint=true) [{error}]"
        )
        reported.errno = errno.ENOSPC
        return reported
    if not isinstance(error, OSError):
        return None
    reported = CheckpointSaveError(
        f"could not write checkpoint {name} under {root} ({error}); earlier checkpoints are "
        "intact; fix the cause and resume (resume_from_checkpoint=true)"
    )
    reported.errno = cause
    return reported


def write_hf_weights(
    checkpointer: Any, weights: dict[str, Any], step_folder: Path, adapter_only: bool
) -> None:
    """Write ``model/`` and (LoRA/DoRA) ``adapter/`` inside ``step_folder``.

    Args:
        checkpointer: the student's ``FullModelHFCheckpointer`` (after ``load_checkpoint``).
        weights: from :func:`weights_to_save`: ``training.MODEL_KEY`` (full or merged weights),
            and for LoRA/DoRA ``training.ADAPTER_KEY`` and ``training.ADAPTER_CONFIG``.
        adapter_only: ``save_adapter_weights_only``: no ``model/`` (``weights`` has no model).
    """
    if (training.MODEL_KEY in weights) == adapter_only:
        raise ValueError(
            f"adapter_only = {adapter_only} but the weights to save "
            f"{'hold' if adapter_only else 'lack'} the model's: build them with weights_to_save"
        )
    if training.MODEL_KEY in weights:
        hf_export.write_model_folder(
            checkpointer, weights[training.MODEL_KEY], step_folder / MODEL_DIRNAME
        )
    if training.ADAPTER_KEY in weights:
        adapter_dir = step_folder / ADAPTER_DIRNAME
        adapter_dir.mkdir()
        if weights[training.ADAPTER_CONFIG]["peft_exact"]:
            hf_export.write_adapter_folder(
                checkpointer,
                weights[training.ADAPTER_KEY],
                weights[training.ADAPTER_CONFIG],
                adapter_dir,
            )
        torch.save(weights[training.ADAPTER_KEY], adapter_dir / ADAPTER_FILENAME)
        hf_export.make_readable(adapter_dir)


def save_checkpoint_folder(
    output_dir: str | Path,
    step: int,
    write_weights: Callable[[Path], None],
    training_state: dict[str, Any],
    manifest: dict[str, Any],
) -> Path:
    """Assemble ``checkpoints/step_N`` durably and atomically and return it (rank 0).

    In ``.staging_step_N/``: the weights, ``training_state.pt``, every file and folder
    fsynced, then ``manifest.json`` (``manifest`` plus ``step``, the files with their sizes,
    ``save_seq`` and ``saved_at``). Then the folder is renamed into place (an existing
    ``step_N`` is set aside and deleted once the new one is in place) and the checkpoints
    folder fsynced.

    Args:
        output_dir: the run's output folder.
        step: optimizer steps done (names the folder).
        write_weights: writes ``model/`` and ``adapter/`` inside the given staging step folder
            (see :func:`write_hf_weights`).
        training_state: saved as ``training_state.pt``.
        manifest: saved as ``manifest.json``, last; the caller's part holds ``run_id`` and
            ``parent`` (:func:`new_run_lineage`).

    Raises:
        CheckpointSaveError: a write failed (disk full or another ``OSError``); the staging
            folder is deleted, earlier checkpoints are intact.
    """
    root = checkpoints_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    recover_interrupted_saves(output_dir)
    name = step_dirname(step)
    staging = root / f"{STAGING_PREFIX}{name}"
    lineage = {
        "save_seq": _next_save_seq(output_dir),
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        staging.mkdir()
        write_weights(staging)
        _torch_save_atomic(training_state, staging / TRAINING_STATE_FILENAME)
        sizes = _file_sizes(staging)
        fsync_tree(staging)
        payload = {**manifest, "step": step, **lineage, "files": sorted(sizes)}
        _write_json_atomic(staging / MANIFEST_FILENAME, payload | {"file_sizes": sizes})
        _fsync(staging)
        _install(staging, root / name)
    except BaseException as error:
        reported = _save_error(error, root, name)
        shutil.rmtree(staging, ignore_errors=True)
        if reported is None:
            raise
        raise reported from error
    return root / name


def prune_checkpoints(output_dir: str | Path, keep_last: int | None) -> list[Path]:
    """Keep the first ``keep_last`` checkpoints of :func:`resume_order` (the branch being
    trained, newest first) and the one ``resume_from_checkpoint = true`` would resume from;
    delete the others (older ones, and those of abandoned branches). Return the deleted ones."""
    if keep_last is None:
        return []
    kept = set(resume_order(output_dir)[:keep_last]) | {resume_candidate(output_dir)}
    doomed = [f for f in checkpoints_by_save_order(output_dir) if f not in kept]
    for folder in doomed:
        shutil.rmtree(folder)
    return doomed


def hf_weight_files(folder: Path) -> list[str]:
    """The safetensors shards of a Hugging Face model folder (a checkpoint's ``model/``), from
    its index file."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return sorted(set(index["weight_map"].values()))


def capture_rng_state(device: torch.device) -> dict[str, Any]:
    """Every random generator the run uses, to restore bit-for-bit on resume."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def rank_rng_state(saved: list[dict[str, Any]], rank: int) -> dict[str, Any]:
    """This rank's generator states from a checkpoint's ``rng`` entry (one per rank: each rank
    seeds ``seed + rank``, so their streams differ)."""
    return saved[rank]


def restore_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# --------------------------------------------------------------------------------------------
# Resume bookkeeping
# --------------------------------------------------------------------------------------------

RESUME_INVARIANTS = (
    "seed",
    "batch_size",
    "gradient_accumulation_steps",
    "steps_per_epoch",
    "world_size",
)
"""Settings of a run that must not change across a resume, or the resumed run would not
continue the same sequence of batches and steps."""


def read_resume_state(
    output_dir: str | Path, resume_from_checkpoint: bool | str, *, is_main: bool
) -> tuple[Path | None, dict[str, Any] | None, dict[str, Any]]:
    """The checkpoint to resume from and its training state (or ``None, None``), and this
    launch's lineage for its manifests (:func:`new_run_lineage`).

    Rank 0 alone finishes interrupted saves (:func:`recover_interrupted_saves`), looks for,
    checks and reads the checkpoint (:func:`resolve_resume`; the other ranks need neither the
    files nor the memory of the optimizer state) and shares the rest; an error there is
    raised on every rank. Only rank 0's state holds ``"optimizer"`` (it broadcasts it when
    loading). A collective under several processes.
    """
    folder = state = shared = error = lineage = None
    if is_main:
        try:
            recover_interrupted_saves(output_dir)
            folder, state = resolve_resume(output_dir, resume_from_checkpoint)
        except (ValueError, OSError) as raised:
            error = raised
        if state is not None:
            shared = {key: value for key, value in state.items() if key != "optimizer"}
        lineage = new_run_lineage(folder)
    folder, shared, error, lineage = process_group.broadcast_object(
        (folder, shared, error, lineage)
    )
    if error is not None:
        raise error
    if state is not None:
        shared["optimizer"] = state["optimizer"]
    return folder, shared, lineage


def resumed_progress(
    resumed: dict[str, Any], now: dict[str, Any], steps_per_epoch: int
) -> tuple[int, int, int]:
    """``(global_step, epoch, steps_in_epoch)`` to continue from, after checking that the run's
    invariants (``now``, keyed by :data:`RESUME_INVARIANTS`) are those of the checkpoint.

    Raises:
        ValueError: an invariant changed (the resumed run could not continue exactly).
    """
    saved = resumed["run"]
    for key in RESUME_INVARIANTS:
        if saved[key] != now[key]:
            raise ValueError(
                f"cannot resume exactly: {key} was {saved[key]} in the checkpoint and is "
                f"{now[key]} now; resume with the checkpoint's settings (batch_size, "
                "gradient_accumulation_steps, max_steps_per_epoch, seed, process count)"
            )
    progress = resumed["progress"]
    epoch, steps_in_epoch = progress["epoch"], progress["steps_in_epoch"]
    if steps_in_epoch >= steps_per_epoch:  # saved at the end of an epoch
        epoch, steps_in_epoch = epoch + 1, 0
    return progress["global_step"], epoch, steps_in_epoch


def saved_seed(resumed: dict[str, Any], seed: int | None) -> int:
    """The checkpoint's seed; ``seed`` (the config's) must be it or None.

    Raises:
        ValueError: the config asks for another seed.
    """
    saved = resumed["run"]["seed"]
    if seed is not None and seed != saved:
        raise ValueError(
            f"seed = {seed} but the checkpoint was trained with seed {saved}: "
            f"resume with seed={saved} (or null)"
        )
    return saved


def student_start_state(
    checkpointer_node: Any,
    checkpointer: Any,
    model: nn.Module,
    resume_folder: Path | None,
    *,
    seed: int,
) -> dict[str, Tensor]:
    """The student's full state dict to start from (rank 0): the original weights, or a
    checkpoint's, plus fresh or saved adapters for a LoRA/DoRA student.

    The original checkpoint is always read: its weight map lays out the saved shards, and a
    LoRA student's base weights come from it (its saved adapters from ``adapter/``, so a run
    with ``save_adapter_weights_only`` resumes too). A full student's saved weights are read by
    the same HF checkpointer (``checkpointer_node``) pointed at the checkpoint's ``model/``.

    Raises:
        ValueError: a LoRA/DoRA student whose model type has no PEFT export (before any read).
    """
    is_lora = bool(adapter_parameter_names(model))
    if is_lora:
        hf_export.check_peft_export(checkpointer)
        if dora_scales_a_bias(model):
            log.warning(
                "DoRA adapters on layers with a bias: torchtune scales the bias with the DoRA "
                "magnitude, PEFT does not, so checkpoints get no PEFT files in adapter/ (the "
                "merged model/ folder is exact; save_adapter_weights_only keeps only "
                f"adapter/{ADAPTER_FILENAME} for resuming)"
            )
    base = checkpointer.load_checkpoint()[training.MODEL_KEY]
    adapters = None
    if resume_folder is not None:
        if is_lora:
            adapter_file = resume_folder / ADAPTER_DIRNAME / ADAPTER_FILENAME
            adapters = torch.load(adapter_file, weights_only=True)
        else:
            model_dir = resume_folder / MODEL_DIRNAME
            reader = config.instantiate(
                checkpointer_node,
                checkpoint_dir=str(model_dir),
                checkpoint_files=hf_weight_files(model_dir),
            )
            base = reader.load_checkpoint()[training.MODEL_KEY]
    return student_state_dict(model, base, adapters, seed=seed)


# --------------------------------------------------------------------------------------------
# Assembling a checkpoint: LoRA merge, training state, manifest
# --------------------------------------------------------------------------------------------


def lora_rank_and_alpha(model: nn.Module) -> tuple[int, float]:
    """The (shared) rank and alpha of a LoRA/DoRA model's adapters, for merging."""
    pairs: set[tuple[int, float]] = set()
    for module in model.modules():
        lora_a = getattr(module, "lora_a", None)
        if isinstance(lora_a, nn.Linear):
            rank = lora_a.out_features
            alpha = getattr(module, "alpha", None)
            if alpha is None:  # DoRALinear keeps only the scaling alpha / rank
                alpha = module.scaling * rank
            pairs.add((rank, float(alpha)))
    if len(pairs) != 1:
        raise ValueError(f"expected one LoRA rank/alpha in the model, found {sorted(pairs)}")
    return pairs.pop()


def lora_dropout(model: nn.Module) -> float:
    """The (shared) dropout probability of a LoRA/DoRA model's adapters (0 without dropout)."""
    probabilities = {
        module.dropout.p if isinstance(module.dropout, nn.Dropout) else 0.0
        for module in model.modules()
        if isinstance(getattr(module, "lora_a", None), nn.Linear)
    }
    if len(probabilities) != 1:
        raise ValueError(f"expected one LoRA dropout in the model, found {sorted(probabilities)}")
    return probabilities.pop()


def is_dora(model: nn.Module) -> bool:
    return any(hasattr(module, "initialize_dora_magnitude") for module in model.modules())


def dora_scales_a_bias(model: nn.Module) -> bool:
    """Whether a DoRA adapter sits on a layer with a bias (Qwen2's q/k/v).

    torchtune's ``DoRALinear`` scales its whole base output, bias included, by
    ``magnitude / norm``; PEFT's DoRA (as the paper) leaves the bias out, so no PEFT adapter
    reproduces such a student.
    """
    return any(
        hasattr(module, "initialize_dora_magnitude") and getattr(module, "use_bias", False)
        for module in model.modules()
    )


def _dora_scaled_biases(state: dict[str, Tensor], rank: int, alpha: float) -> dict[str, Tensor]:
    """The biases of DoRA layers as ``DoRALinear`` applies them: ``bias [out]`` times
    ``magnitude [out] / ||W + (alpha / rank) B A||`` (row norms). torchtune's
    ``get_merged_lora_ckpt`` scales the weight only, which changes such a student's outputs."""
    scaled = {}
    for key, magnitude in state.items():
        module = key.removesuffix(".magnitude")
        if module == key or f"{module}.bias" not in state:
            continue
        lora_a = state[f"{module}.lora_a.weight"]
        lora_b = state[f"{module}.lora_b.weight"]
        weight = state[f"{module}.weight"].to(lora_a.dtype) + (alpha / rank) * lora_b @ lora_a
        bias = state[f"{module}.bias"]
        scaled[f"{module}.bias"] = bias * (magnitude / torch.linalg.norm(weight, dim=1)).to(
            bias.dtype
        )
    return scaled


def weights_to_save(
    student: nn.Module, state: dict[str, Tensor], *, is_lora: bool, adapter_only: bool
) -> dict[str, Any]:
    """What :func:`write_hf_weights` writes: full weights, or adapter (+ merged) weights and
    the adapter settings for LoRA/DoRA.

    ``state`` is the gathered full state dict, or only the adapters when ``adapter_only``; it
    is merged in place (``get_merged_lora_ckpt``), so pass a dict no one else holds.
    """
    if not is_lora:
        return {training.MODEL_KEY: state}
    rank, alpha = lora_rank_and_alpha(student)
    weights: dict[str, Any] = {
        training.ADAPTER_KEY: get_adapter_state_dict(state),
        training.ADAPTER_CONFIG: {
            "r": rank,
            "lora_alpha": alpha,
            "lora_dropout": lora_dropout(student),
            "use_dora": is_dora(student),
            "peft_exact": not dora_scales_a_bias(student),
        },
    }
    if not adapter_only:
        biases = _dora_scaled_biases(state, rank, alpha)
        merged = get_merged_lora_ckpt(state, rank=rank, alpha=alpha)
        weights[training.MODEL_KEY] = {**merged, **biases}
    return weights


def save_step_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    checkpointer: Any,
    weights: dict[str, Any],
    adapter_only: bool,
    training_state: dict[str, Any],
    manifest: dict[str, Any],
    keep_last: int | None,
) -> Path:
    """Write ``checkpoints/step_<step>/`` atomically (``model/`` and ``adapter/`` by
    :func:`write_hf_weights`), then prune to the newest ``keep_last``. Rank 0 only."""
    folder = save_checkpoint_folder(
        output_dir,
        step,
        lambda staging: write_hf_weights(checkpointer, weights, staging, adapter_only),
        training_state,
        manifest,
    )
    prune_checkpoints(output_dir, keep_last)
    log.info(f"saved checkpoint {folder}")
    return folder
