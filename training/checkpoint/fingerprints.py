"""What a checkpoint was trained from: recorded in its manifest, compared when it is resumed.

A checkpoint's ``manifest.json`` holds ``fingerprints`` (:func:`record`), one entry per group;
files are recorded by size and SHA-256 of their content (their path only for messages, so
data moved to another folder still matches):

- ``data``: the training ``dataset`` node(s), every data file by content (a Hub dataset: its
  name and options as given; its files are not ours to hash);
- ``tokenizer``: the ``tokenizer`` node, its files by content (``max_seq_len`` included);
- ``model``: the student's builder node (the model's shape; LoRA/DoRA rank, alpha, targets);
- ``student_base``: LoRA/DoRA students only, the base checkpoint's weight files (a full student
  resumes from its own saved weights, so its base is not recorded);
- ``teacher``: the teacher's builder, ``teacher_quantization`` and checkpoint files, or with
  a ``teacher_cache`` the SHA-256 of its ``manifest.json`` (which lists every shard's SHA-256);
- ``config``: the keys in :data:`MATH_KEYS`, by value.

Not compared here: ``batch_size``, ``gradient_accumulation_steps``, ``seed``,
``max_steps_per_epoch`` and the process count are :data:`~kdtune.training.checkpoint.resume.RESUME_INVARIANTS`
(a change makes an exact continuation impossible, so no key accepts it); and keys that change
no number of the result: output, logging, saving and validation keys, ``device``, ``compile``,
activation checkpointing and offloading, FSDP options, ``stop_after_steps``,
``deterministic``, ``on_non_finite`` (a skipped step is logged).

On resume (:func:`check`) a difference is an error naming each one, unless its name (a group
above, or one of :data:`MATH_KEYS`) is listed in ``resume_allow_changes``. Large files are
hashed once per process and file version (cache keyed by path, size and mtime); the cost is
about one read of the files at the first save of a run and at resume.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from kdtune.training.checkpoint.layout import CheckpointError
from kdtune.training.config.nodes import checkpoint_files

ALLOW_KEY = "resume_allow_changes"

MATH_KEYS = (
    "dtype",
    "kd_ratio",
    "loss",
    "kd_loss",
    "optimizer",
    "lr_scheduler",
    "epochs",
    "shuffle",
    "clip_grad_norm",
    "on_policy",
    "quantizer",
    "fake_quant_after_n_steps",
)
"""Config keys that change the trained weights (the learning rate schedule spans ``epochs``)."""

GROUPS = ("data", "tokenizer", "model", "student_base", "teacher")
"""The recorded groups besides ``config``."""

_BLOCK = 1 << 24
_hashes: dict[tuple[str, int, int], str] = {}


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's content, cached per (path, size, mtime) in this process."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _hashes:
        digest = hashlib.sha256()
        with path.open("rb") as stream:
            while block := stream.read(_BLOCK):
                digest.update(block)
        _hashes[key] = digest.hexdigest()
    return _hashes[key]


def _file(path: Path) -> dict[str, Any]:
    return {"file": str(path), "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _with_file_contents(value: Any) -> Any:
    """A config value with every existing file (or folder) path replaced by its content."""
    if isinstance(value, dict):
        return {key: _with_file_contents(item) for key, item in sorted(value.items())}
    if isinstance(value, list):
        return [_with_file_contents(item) for item in value]
    if isinstance(value, str) and value:
        path = Path(value)
        if path.is_file():
            return _file(path)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
            return {"folder": value, "files": {str(p.relative_to(path)): _file(p) for p in files}}
    return value


def _plain(node: Any) -> Any:
    if isinstance(node, DictConfig | ListConfig):
        return OmegaConf.to_container(node, resolve=True)
    return node


def _weights(node: DictConfig) -> dict[str, Any]:
    folder = Path(str(node.checkpoint_dir))
    return {name: _file(folder / name) for name in checkpoint_files(node)}


def record(cfg: DictConfig, *, is_lora: bool) -> dict[str, Any]:
    """The fingerprints of a run (see the module doc), for its checkpoints' manifests."""
    teacher: dict[str, Any] | None = None
    if cfg.get("teacher_cache") is not None:
        manifest = Path(str(cfg.teacher_cache)) / "manifest.json"
        teacher = {"teacher_cache": _file(manifest)}
    elif cfg.get("teacher_model") is not None:
        teacher = {
            "teacher_model": _plain(cfg.teacher_model),
            "teacher_quantization": cfg.get("teacher_quantization"),
            "files": _weights(cfg.teacher_checkpointer),
        }
    fingerprints = {
        "data": _with_file_contents(_plain(cfg.dataset)),
        "tokenizer": _with_file_contents(_plain(cfg.tokenizer)),
        "model": _plain(cfg.model),
        "teacher": teacher,
        "config": {key: _plain(cfg.get(key)) for key in MATH_KEYS},
    }
    if is_lora:
        fingerprints["student_base"] = _weights(cfg.checkpointer)
    return fingerprints


def _is_file(value: Any) -> bool:
    return isinstance(value, dict) and "sha256" in value and "file" in value


def _differences(saved: Any, now: Any, where: str) -> list[str]:
    """Where ``saved`` and ``now`` differ, each as one phrase; files compare by content."""
    if _is_file(saved) and _is_file(now):
        if saved["sha256"] == now["sha256"]:
            return []
        return [f"{where}: {now['file']} has other content than {saved['file']} had"]
    if isinstance(saved, dict) and isinstance(now, dict):
        found = []
        for key in sorted(set(saved) | set(now), key=str):
            found += _differences(saved.get(key), now.get(key), f"{where}.{key}")
        return found
    if isinstance(saved, list) and isinstance(now, list) and len(saved) == len(now):
        found = []
        for index, (a, b) in enumerate(zip(saved, now)):
            found += _differences(a, b, f"{where}[{index}]")
        return found
    if json.dumps(saved, sort_keys=True) == json.dumps(now, sort_keys=True):
        return []
    return [f"{where}: {_short(saved)} in the checkpoint, {_short(now)} now"]


def _short(value: Any) -> str:
    if _is_file(value):
        return f"file {value['file']}"
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def differences(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, list[str]]:
    """``{name: [difference, ...]}`` by accepting name (a group, or a config key)."""
    found: dict[str, list[str]] = {}
    for group in GROUPS:
        if group in saved:
            lines = _differences(saved[group], now.get(group), group)
            if lines:
                found[group] = lines
    for key, value in saved.get("config", {}).items():
        lines = _differences(value, now["config"].get(key), key)
        if lines:
            found[key] = lines
    return found


def check(folder: Path, manifest: dict[str, Any], cfg: DictConfig) -> None:
    """Refuse to resume ``folder`` when the run's inputs differ from the checkpoint's.

    Raises:
        CheckpointError: naming each difference not accepted by ``resume_allow_changes`` (or
            an unknown name in it), and the key that accepts them.
    """
    saved = manifest.get("fingerprints")
    if not isinstance(saved, dict):  # a checkpoint of an older kdtune
        warnings.warn(
            f"checkpoint {folder} records no fingerprints of its inputs (saved by an older "
            "kdtune): the data, tokenizer, weights and settings it was trained with are not "
            "compared with this config",
            stacklevel=3,
        )
        return
    allowed = [str(name) for name in (cfg.get(ALLOW_KEY) or [])]
    known = (*GROUPS, *MATH_KEYS)
    unknown = [name for name in allowed if name not in known]
    if unknown:
        raise CheckpointError(
            f"{ALLOW_KEY} = {allowed}: unknown name(s) {unknown}; use names of {list(known)}"
        )
    now = record(cfg, is_lora="student_base" in saved)
    refused = {
        name: lines for name, lines in differences(saved, now).items() if name not in allowed
    }
    if refused:
        lines = "\n".join(f"  - {line}" for group in refused.values() for line in group)
        names = ", ".join(refused)
        raise CheckpointError(
            f"checkpoint {folder} was trained from other inputs than this config gives:\n{lines}\n"
            f"Resume with the checkpoint's inputs, or accept the change on purpose with "
            f"{ALLOW_KEY}=[{names}]"
        )


def file_hashes(folder: Path, names: list[str]) -> dict[str, str]:
    """``{relative path: SHA-256}`` of files in a checkpoint folder (written at save)."""
    return {name: sha256_file(folder / name) for name in names}


def file_hash_problem(folder: Path, manifest: dict[str, Any]) -> str | None:
    """The first file of ``folder`` whose content is not what the save wrote, or None
    (manifests without hashes: None)."""
    recorded = manifest.get("file_sha256")
    if not isinstance(recorded, dict):
        return None
    for name, digest in recorded.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if sha256_file(path) != digest:
            return f"{name} does not match the SHA-256 written at save (replaced or damaged)"
    return None


def release_cache() -> None:
    """Forget the hashes of this process (tests that rewrite files within one mtime tick)."""
    _hashes.clear()
