"""Resuming: which checkpoint a launch continues, its training state, RNG and progress.

``resume_from_checkpoint: true`` continues the most recently *saved* checkpoint of the
branch trained last (see :mod:`kdtune.training.checkpoint.layout` for the lineage); a
checkpoint failing the cheap checks, whose training state does not load, or whose files do not
match the SHA-256 written at save, falls back to the previous one of its branch with a warning
naming both. The training state is read with ``weights_only=True``; the run's inputs are
compared with the checkpoint's fingerprints (:mod:`~kdtune.training.checkpoint.fingerprints`).
"""

from __future__ import annotations

import pickle
import random
import re
import secrets
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torchtune import config, training, utils

from kdtune.training import process_group
from kdtune.training.adapters import (
    adapter_parameter_names,
    dora_scales_a_bias,
    student_state_dict,
)
from kdtune.training.checkpoint import fingerprints, hf_export
from kdtune.training.checkpoint.layout import (
    ADAPTER_DIRNAME,
    ADAPTER_FILENAME,
    MANIFEST_FILENAME,
    MODEL_DIRNAME,
    TRAINING_STATE_FILENAME,
    CheckpointError,
    checkpoint_problem,
    checkpoint_step,
    checkpoints_root,
    complete_checkpoints,
    hf_weight_files,
    is_complete,
    manifest_or_none,
    read_manifest,
    resume_order,
    save_order_key,
)
from kdtune.training.checkpoint.save import recover_interrupted_saves
from kdtune.training.config.errors import ConfigError
from kdtune.training.model_facts import describe_model

log = utils.get_logger("INFO")


_TRAINING_STATE_KEYS = ("optimizer", "dataloader", "rng", "run", "progress")


TRUST_PICKLE_KEY = "resume_trust_pickled_state"


class UntrustedCheckpointError(ValueError):
    """A ``training_state.pt`` that only full unpickling reads (which can run code stored in
    the file); refused unless :data:`TRUST_PICKLE_KEY` is true. Not a corrupt checkpoint: no
    fallback to an earlier one."""


def load_training_state(folder: Path, *, trust_pickle: bool = False) -> dict[str, Any]:
    """The training state of a checkpoint, read with ``torch.load(weights_only=True)``.

    Tensors and plain values only (:func:`capture_rng_state` stores the RNG states so). A file
    that needs full unpickling (a checkpoint of kdtune before it stored numpy's state as a
    tensor, or a crafted file) is refused, unless ``trust_pickle`` (then read with a warning).

    Raises:
        UntrustedCheckpointError: the file holds pickled objects and ``trust_pickle`` is false.
    """
    path = folder / TRAINING_STATE_FILENAME
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if not trust_pickle:
            raise UntrustedCheckpointError(
                f"{path} holds pickled Python objects ({_unsupported_global(error)}) that "
                "weights-only loading refuses: an older kdtune checkpoint, or a crafted file; "
                f"if you wrote it, resume with {TRUST_PICKLE_KEY}=true (full unpickling runs "
                "any code stored in the file)"
            ) from None
    warnings.warn(
        f"{path}: read with full unpickling ({TRUST_PICKLE_KEY} = true); the next checkpoint "
        "is saved without pickled objects",
        stacklevel=2,
    )
    return torch.load(path, map_location="cpu", weights_only=False)


def _unsupported_global(error: BaseException) -> str:
    """The first global torch's weights-only unpickler refused, from its message."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    return found.group(1) if found else "not tensors or plain values"


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error) else ""


def load_checked_training_state(folder: Path, *, trust_pickle: bool = False) -> dict[str, Any]:
    """The training state of ``folder`` once the folder passes :func:`checkpoint_problem`.

    Raises:
        CheckpointError: naming ``folder`` and what is wrong with it.
        UntrustedCheckpointError: see :func:`load_training_state`.
    """
    problem = checkpoint_problem(folder)
    if problem is None:
        try:
            state = load_training_state(folder, trust_pickle=trust_pickle)
        except UntrustedCheckpointError:
            raise
        except Exception as error:  # a truncated or foreign file fails in many ways
            problem = (
                f"{TRAINING_STATE_FILENAME} does not load ({type(error).__name__}: "
                f"{_first_line(error)})"
            )
        else:
            missing = [
                key
                for key in _TRAINING_STATE_KEYS
                if not isinstance(state, dict) or key not in state
            ]
            if missing:
                problem = f"{TRAINING_STATE_FILENAME} lacks {', '.join(missing)}"
            else:  # every file as the save wrote it (a same-size replacement included)
                problem = fingerprints.file_hash_problem(folder, read_manifest(folder))
            if problem is None:
                return state
    raise CheckpointError(f"checkpoint {folder} cannot be resumed from: {problem}")


def _latest_resumable(
    output_dir: str | Path, trust_pickle: bool = False
) -> tuple[Path, dict[str, Any]]:
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
            state = load_checked_training_state(folder, trust_pickle=trust_pickle)
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
    step, key = checkpoint_step(folder), save_order_key(folder)
    return [
        other
        for other in complete_checkpoints(output_dir)
        if other.resolve() != chosen
        and (
            (step is not None and (checkpoint_step(other) or 0) > step)
            or (same_root and save_order_key(other) > key)
        )
    ]


def resolve_resume(
    output_dir: str | Path, resume_from_checkpoint: bool | str, *, trust_pickle: bool = False
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
        return _latest_resumable(output_dir, trust_pickle)
    folder = Path(resume_from_checkpoint)
    if not is_complete(folder):
        raise CheckpointError(
            f"resume_from_checkpoint = {resume_from_checkpoint!r} is not a complete checkpoint "
            f"folder (no {MANIFEST_FILENAME}): use true for the latest one or a step_N folder"
        )
    state = load_checked_training_state(folder, trust_pickle=trust_pickle)
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
        manifest = manifest_or_none(resume_folder) or {}
        parent = {
            "folder": str(resume_folder.resolve()),
            "run_id": manifest.get("run_id"),
            "step": manifest.get("step"),
            "save_seq": manifest.get("save_seq", 0),
        }
    return {"run_id": run_id, "parent": parent}


def capture_rng_state(device: torch.device) -> dict[str, Any]:
    """Every random generator the run uses, to restore bit-for-bit on resume, as tensors and
    plain values (so ``training_state.pt`` loads with ``weights_only=True``): torch's (and
    CUDA's) ``[N]`` uint8 state, numpy's MT19937 ``key`` as a ``[624]`` int64 tensor with its
    ``pos``, ``has_gauss`` and ``gauss``, Python's ``random.getstate()`` (ints in tuples)."""
    numpy_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": str(numpy_state["bit_generator"]),
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
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
    """Set the generators to :func:`capture_rng_state`'s ``state`` (also the numpy tuple of
    checkpoints from before it was stored as a tensor)."""
    torch.set_rng_state(state["torch"])
    saved = state["numpy"]
    if isinstance(saved, dict):
        saved = {
            "bit_generator": saved["bit_generator"],
            "state": {"key": saved["key"].numpy().astype(np.uint32), "pos": saved["pos"]},
            "has_gauss": saved["has_gauss"],
            "gauss": saved["gauss"],
        }
    np.random.set_state(saved)
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


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
    output_dir: str | Path,
    resume_from_checkpoint: bool | str,
    *,
    is_main: bool,
    cfg: DictConfig | None = None,
) -> tuple[Path | None, dict[str, Any] | None, dict[str, Any]]:
    """The checkpoint to resume from and its training state (or ``None, None``), and this
    launch's lineage for its manifests (:func:`new_run_lineage`).

    Rank 0 alone finishes interrupted saves (:func:`recover_interrupted_saves`), looks for,
    checks and reads the checkpoint (:func:`resolve_resume`; the other ranks need neither the
    files nor the memory of the optimizer state) and shares the rest; an error there is
    raised on every rank. Only rank 0's state holds ``"optimizer"`` (it broadcasts it when
    loading). A collective under several processes.

    ``cfg`` (the run's checked config) supplies :data:`TRUST_PICKLE_KEY`, and the inputs the
    checkpoint's recorded fingerprints are compared with
    (:func:`~kdtune.training.checkpoint.fingerprints.check`; ``resume_allow_changes``).
    """
    trust_pickle = bool(cfg.get(TRUST_PICKLE_KEY, False)) if cfg is not None else False
    folder = state = shared = error = lineage = None
    if is_main:
        try:
            recover_interrupted_saves(output_dir)
            folder, state = resolve_resume(
                output_dir, resume_from_checkpoint, trust_pickle=trust_pickle
            )
            if folder is not None and cfg is not None:
                # the kind of student first: its message is clearer than the shapes differing
                if cfg.get("model") is not None:
                    check_student_kind(folder, describe_model(cfg.model).has_adapters)
                fingerprints.check(folder, read_manifest(folder), cfg)
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


def check_student_kind(resume_folder: Path | None, is_lora: bool) -> None:
    """A LoRA/DoRA checkpoint resumes a LoRA/DoRA student, a full one a full student (read
    on every rank before any weights load; else the optimizer state would not fit).

    Raises:
        ConfigError: naming the checkpoint, what it holds, and the fix.
    """
    if resume_folder is None:
        return
    saved_lora = (resume_folder / ADAPTER_DIRNAME / ADAPTER_FILENAME).is_file()
    if saved_lora == is_lora:
        return
    saved, configured = ("LoRA/DoRA", "full-parameter") if saved_lora else ("full", "LoRA/DoRA")
    raise ConfigError(
        f"resume_from_checkpoint: {resume_folder} holds a {saved} student, but model builds a "
        f"{configured} student: resume with the config it was trained with (kdtune keeps it in "
        f"{resume_folder.parent.parent}/logs/config.yaml), or train into a new output_dir"
    )


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
