"""Step checkpoints: Hugging Face weights plus the training state, written atomically.

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
        manifest.json          written last: a folder without it is incomplete

A checkpoint is assembled in ``.staging_step_N/`` and moved into place with one ``os.replace``,
so a crash while saving leaves every earlier checkpoint intact and never leaves a half-written
``step_N`` behind. ``model/`` and ``adapter/`` are written by :mod:`kdtune.training.hf_export`
(model weights by torchtune's ``FullModelHFCheckpointer``, which loads them back). In a
multi-process run the caller gathers the full state on rank 0, which alone writes.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
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


def checkpoints_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS_DIRNAME


def step_dirname(step: int) -> str:
    return f"step_{step:07d}"


def is_complete(folder: Path) -> bool:
    """A checkpoint folder is complete once its manifest exists (it is written last)."""
    return (folder / MANIFEST_FILENAME).is_file()


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders, oldest step first."""
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for folder in root.iterdir():
        match = _STEP_DIR.match(folder.name)
        if match and folder.is_dir() and is_complete(folder):
            found.append((int(match.group(1)), folder))
    return [folder for _, folder in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under ``output_dir``, or None."""
    folders = complete_checkpoints(output_dir)
    return folders[-1] if folders else None


def resolve_resume_folder(
    output_dir: str | Path, resume_from_checkpoint: bool | str
) -> Path | None:
    """Which checkpoint to resume from: None (fresh run), the latest, or the given folder.

    Raises:
        ValueError: ``false`` while ``output_dir`` already holds checkpoints (a later resume
            would mix the two runs), ``true`` with no complete checkpoint, or a path that is
            not a complete checkpoint.
    """
    if resume_from_checkpoint is False:
        existing = complete_checkpoints(output_dir)
        if existing:
            raise ValueError(
                f"output_dir {output_dir} already holds checkpoints of an earlier run "
                f"({', '.join(f.name for f in existing)}): continue it with "
                "resume_from_checkpoint=true, or choose another output_dir"
            )
        return None
    if resume_from_checkpoint is True:
        folder = latest_checkpoint(output_dir)
        if folder is None:
            raise ValueError(
                f"resume_from_checkpoint = true but {checkpoints_root(output_dir)} holds no "
                "complete checkpoint (a folder step_N with manifest.json): set it to false "
                "for a fresh run, or point output_dir at the earlier run"
            )
        return folder
    folder = Path(resume_from_checkpoint)
    if not is_complete(folder):
        raise ValueError(
            f"resume_from_checkpoint = {resume_from_checkpoint!r} is not a complete checkpoint "
            f"folder (no {MANIFEST_FILENAME}): use true for the latest one or a step_N folder"
        )
    return folder


def read_manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / MANIFEST_FILENAME).read_text())


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
    """Assemble ``checkpoints/step_N`` atomically and return it.

    Args:
        output_dir: the run's output folder.
        step: optimizer steps done (names the folder).
        write_weights: writes ``model/`` and ``adapter/`` inside the given staging step folder
            (see :func:`write_hf_weights`).
        training_state: saved as ``training_state.pt``.
        manifest: saved as ``manifest.json``, last.
    """
    root = checkpoints_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = step_dirname(step)
    staging = root / f".staging_{name}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    write_weights(staging)
    folder = staging
    _torch_save_atomic(training_state, folder / TRAINING_STATE_FILENAME)
    files = sorted(path.name for path in folder.iterdir())
    _write_json_atomic(folder / MANIFEST_FILENAME, {**manifest, "step": step, "files": files})
    final = root / name
    if final.exists():  # the same step saved again (e.g. a rerun): replace it
        shutil.rmtree(final)
    os.replace(folder, final)
    shutil.rmtree(staging, ignore_errors=True)
    return final


def prune_checkpoints(output_dir: str | Path, keep_last: int | None) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints; return the deleted ones."""
    if keep_last is None:
        return []
    folders = complete_checkpoints(output_dir)
    doomed = folders[:-keep_last] if len(folders) > keep_last else []
    for folder in doomed:
        shutil.rmtree(folder)
    return doomed


def load_training_state(folder: Path) -> dict[str, Any]:
    """The training state of a checkpoint (our own file: RNG states need full unpickling)."""
    return torch.load(folder / TRAINING_STATE_FILENAME, map_location="cpu", weights_only=False)


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
) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint to resume from and its training state, or ``(None, None)``.

    Rank 0 alone looks for and reads the checkpoint (the other ranks need neither the files
    nor the memory of the optimizer state) and shares the rest; an error there is raised on
    every rank. Only rank 0's state holds ``"optimizer"`` (it broadcasts it when loading). A
    collective under several processes.
    """
    folder = state = shared = error = None
    if is_main:
        try:
            folder = resolve_resume_folder(output_dir, resume_from_checkpoint)
            state = load_training_state(folder) if folder is not None else None
        except ValueError as raised:
            error = raised
        if state is not None:
            shared = {key: value for key, value in state.items() if key != "optimizer"}
    folder, shared, error = process_group.broadcast_object((folder, shared, error))
    if error is not None:
        raise error
    if state is not None:
        shared["optimizer"] = state["optimizer"]
    return folder, shared


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
