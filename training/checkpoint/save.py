"""Saving a step checkpoint durably: staging folder, fsync, manifest last, atomic rename.

What goes in a checkpoint (full weights, or adapters plus merged weights for LoRA/DoRA) is
decided by :func:`weights_to_save`; :func:`save_checkpoint_folder` makes it durable.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchtune import training, utils
from torchtune.modules.peft import get_adapter_state_dict

from kdtune.training.adapters import (
    dora_scales_a_bias,
    is_dora,
    lora_dropout,
    lora_rank_and_alpha,
    merged_state_dict,
)
from kdtune.training.checkpoint import fingerprints, hf_export
from kdtune.training.checkpoint.layout import (
    ADAPTER_DIRNAME,
    ADAPTER_FILENAME,
    ASIDE_PREFIX,
    MANIFEST_FILENAME,
    MODEL_DIRNAME,
    STAGING_PREFIX,
    TRAINING_STATE_FILENAME,
    CheckpointSaveError,
    checkpoints_by_save_order,
    checkpoints_root,
    complete_checkpoints,
    is_complete,
    manifest_or_none,
    resume_candidate,
    resume_order,
    step_dirname,
)

log = utils.get_logger("INFO")


LOW_SPACE_BYTES = 64 * 2**20
"""A failed write with less free space than this is reported as a full disk (``torch.save``
and safetensors do not always raise ``ENOSPC`` themselves)."""


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
        for manifest in map(manifest_or_none, complete_checkpoints(output_dir))
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
    fsynced, then ``manifest.json`` (``manifest`` plus ``step``, the files with their sizes and
    SHA-256, ``save_seq`` and ``saved_at``). Then the folder is renamed into place (an existing
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
        hashes = fingerprints.file_hashes(staging, sorted(sizes))  # checked on resume
        payload |= {"file_sizes": sizes, "file_sha256": hashes}
        _write_json_atomic(staging / MANIFEST_FILENAME, payload)
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


def weights_to_save(
    student: nn.Module, state: dict[str, Tensor], *, is_lora: bool, adapter_only: bool
) -> dict[str, Any]:
    """What :func:`write_hf_weights` writes: full weights, or adapter (+ merged) weights and
    the adapter settings for LoRA/DoRA.

    ``state`` is the gathered full state dict, or only the adapters when ``adapter_only``
    (merged in fp32 and rounded once: :func:`~kdtune.training.adapters.merged_state_dict`).
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
        weights[training.MODEL_KEY] = merged_state_dict(state, rank, alpha)
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
