"""The cache's manifest: what it was built from, and the check that training uses the same.

``manifest.json`` (written last, so a folder without it is an unfinished build) records the
encoding (k, bits per id, knot ranks), the temperature, the compared vocabulary size, the
``ignore_index``, ``max_seq_len``, the number of samples, every shard with its SHA-256, and
fingerprints (SHA-256) of:

- ``tokenizer``: the tokenizer node without ``max_seq_len`` (compared on its own), every file
  it names hashed by content (so a cache moved to another machine or folder still matches);
- ``dataset``: the training dataset node(s) the same way (data files by content);
- ``teacher_weights``: the teacher's checkpoint files by content, its builder, dtype and
  quantisation (recorded, not compared: training from the cache needs no teacher).

:func:`check_manifest` compares a manifest with a training config and raises one error that
names every difference.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from huggingface_hub.utils.sha import sha_fileobj
from omegaconf import DictConfig, ListConfig, OmegaConf

from kdtune.training.config.errors import ConfigError
from kdtune.training.config.nodes import checkpoint_files, component_options

MANIFEST = "manifest.json"
FORMAT = "kdtune-teacher-cache"
FORMAT_VERSION = 1


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in blocks (huggingface_hub's, a torchtune dependency)."""
    with path.open("rb") as stream:
        return sha_fileobj(stream).hex()


def _content_hash(value: Any) -> Any:
    """A config value with every existing file (or folder) path replaced by its content hash."""
    if isinstance(value, dict):
        return {key: _content_hash(item) for key, item in sorted(value.items())}
    if isinstance(value, list):
        return [_content_hash(item) for item in value]
    if isinstance(value, str) and value:
        path = Path(value)
        if path.is_file():
            return {"file_sha256": sha256_file(path)}
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
            return {"dir_sha256": {str(p.relative_to(path)): sha256_file(p) for p in files}}
    return value


def node_fingerprint(node: DictConfig | ListConfig | None, drop: tuple[str, ...] = ()) -> str:
    """SHA-256 of a config node, its files hashed by content, keys in ``drop`` left out."""
    container = OmegaConf.to_container(node, resolve=True) if node is not None else None
    if isinstance(container, dict):
        container = {key: value for key, value in container.items() if key not in drop}
    text = json.dumps(_content_hash(container), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def teacher_fingerprint(cfg: DictConfig) -> str:
    """SHA-256 over the teacher's builder, dtype, quantisation and checkpoint file contents."""
    node = cfg.teacher_checkpointer
    folder = Path(str(node.checkpoint_dir))
    files = {name: sha256_file(folder / name) for name in checkpoint_files(node)}
    identity = {
        "builder": OmegaConf.to_container(cfg.teacher_model, resolve=True),
        "dtype": str(cfg.dtype),
        "quantization": cfg.teacher_quantization,
        "files": files,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def max_seq_len(cfg: DictConfig) -> int | None:
    value = cfg.tokenizer.get("max_seq_len")
    return int(value) if value is not None else None


def kd_options(cfg: DictConfig) -> dict[str, Any]:
    """The KD loss's temperature, ignore_index and vocab_columns (class defaults filled in)."""
    if cfg.get("kd_loss") is None:
        raise ConfigError(
            "kd_loss is null: a teacher cache is built and used for a KD loss; set kd_loss "
            "(e.g. kdtune.losses.ForwardKLWithChunkedOutputLoss)"
        )
    options = component_options(cfg.kd_loss)
    return {
        "temperature": float(options.get("temperature", 1.0)),
        "ignore_index": int(options.get("ignore_index", -100)),
        "vocab_columns": options.get("vocab_columns"),
    }


def data_identity(cfg: DictConfig, num_samples: int) -> dict[str, Any]:
    """What a cache must agree on with a training config (apart from the vocabulary)."""
    options = kd_options(cfg)
    return {
        "tokenizer": node_fingerprint(cfg.tokenizer, drop=("max_seq_len",)),
        "dataset": node_fingerprint(cfg.dataset),
        "max_seq_len": max_seq_len(cfg),
        "num_samples": num_samples,
        "temperature": options["temperature"],
        "ignore_index": options["ignore_index"],
    }


# What each compared field is, and how to fix a difference.
_FIELDS = {
    "tokenizer": "the tokenizer (its files or options)",
    "dataset": "the training data (the dataset node or its data files)",
    "max_seq_len": "tokenizer.max_seq_len",
    "num_samples": "the number of training samples",
    "temperature": "kd_loss.temperature",
    "ignore_index": "kd_loss.ignore_index",
    "vocab_size": "the vocabulary compared (kd_loss.vocab_columns, else the student's vocab)",
}


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a complete cache.

    Raises:
        ConfigError: no cache (or an unfinished build) in ``folder``.
    """
    path = Path(folder) / MANIFEST
    if not path.is_file():
        state = "an unfinished build" if Path(folder).is_dir() else "nothing"
        raise ConfigError(
            f"teacher_cache = {str(folder)!r} holds {state} (no {MANIFEST}): build it first with "
            f"`kdtune cache-teacher --config <this config> teacher_cache={folder}` (a killed "
            "build resumes where it stopped)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise ConfigError(
            f"teacher_cache = {str(folder)!r}: {path} is not valid JSON ({error}); "
            f"{rebuild_hint(folder)}"
        ) from None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or manifest.get("format_version") != FORMAT_VERSION
    ):
        raise ConfigError(
            f"teacher_cache = {str(folder)!r}: {MANIFEST} is not a kdtune teacher cache of format "
            f"version {FORMAT_VERSION}; rebuild it with `kdtune cache-teacher`"
        )
    return manifest


def rebuild_hint(folder: str | Path) -> str:
    """How to repair a cache: the build command keeps every shard whose file matches its
    SHA-256 and rebuilds the others, then writes the manifest again."""
    return (
        f"repair it with `kdtune cache-teacher --config <your config> teacher_cache={folder}` "
        "(rebuilds only missing or damaged shards)"
    )


def check_manifest(manifest: dict[str, Any], expected: dict[str, Any], folder: str | Path) -> None:
    """Raise one :class:`ConfigError` naming every field where cache and config differ."""
    stored = {**manifest["identity"], "vocab_size": manifest["vocab_size"]}
    differences = [
        f"{_FIELDS[key]}: cache {stored.get(key)!r}, config {value!r}"
        if key not in ("tokenizer", "dataset")
        else f"{_FIELDS[key]} differ from those the cache was built from"
        for key, value in expected.items()
        if stored.get(key) != value
    ]
    if differences:
        lines = "\n".join(f"  - {line}" for line in differences)
        raise ConfigError(
            f"teacher_cache = {str(folder)!r} does not match this config:\n{lines}\nRebuild it "
            f"with `kdtune cache-teacher --config <this config> teacher_cache=<new folder>`, or "
            "train with the settings it was built with"
        )


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON to ``path`` through a temporary file and an atomic rename."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
