"""``make_tiny_assets``: a complete offline asset folder (tokenizer, teacher, student, data).

Layout under ``out_dir`` (fixed; see ``.notes/CONTRACTS.md``)::

    tokenizer.model                    tiktoken BPE ranks (same file for both vocab layouts)
    special_tokens.json                HF tokenizer.json-style "added_tokens"
    teacher/config.json, teacher/model.safetensors
    student/config.json, student/model.safetensors
    data/train.json, data/val.json     alpaca records (instruction / input / output)
    manifest.json                      written last: vocab, seed, sizes and sha256 of every file

The seed controls the model weights only (teacher from ``2*seed``, student from ``2*seed + 1``);
tokenizer and data are the same for every seed. A folder whose manifest matches (same format
version, vocab and seed, every file present with its recorded size) is reused as is.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torchtune.models.llama3 import llama3_tokenizer
from torchtune.models.llama3._tokenizer import Llama3Tokenizer

from kdtune.assets import data, tokenizer
from kdtune.assets.checkpoints import write_hf_checkpoint, write_text_atomic
from kdtune.assets.models import STUDENT_DIMS, TEACHER_DIMS
from kdtune.assets.tokenizer import Vocab

MANIFEST_FILE = "manifest.json"
# Bump when the layout or any generated content changes, so old folders are rebuilt, not reused.
FORMAT_VERSION = 1
_MAX_SEED = 2**62


@dataclass(frozen=True)
class TinyAssets:
    """Paths of one tiny asset folder and the model vocabulary size its checkpoints use."""

    root: Path
    tokenizer_path: Path
    special_tokens_path: Path
    teacher_dir: Path
    student_dir: Path
    train_data: Path
    val_data: Path
    vocab_size: int

    @classmethod
    def at(cls, root: str | Path, vocab_size: int) -> TinyAssets:
        """The fixed layout under ``root`` (does not check that the files exist)."""
        root = Path(root)
        return cls(
            root=root,
            tokenizer_path=root / "tokenizer.model",
            special_tokens_path=root / "special_tokens.json",
            teacher_dir=root / "teacher",
            student_dir=root / "student",
            train_data=root / "data" / "train.json",
            val_data=root / "data" / "val.json",
            vocab_size=vocab_size,
        )

    def build_tokenizer(self, max_seq_len: int | None = None) -> Llama3Tokenizer:
        """torchtune's Llama-3 tokenizer on these files (what a YAML ``tokenizer`` node builds)."""
        return llama3_tokenizer(
            str(self.tokenizer_path),
            special_tokens_path=str(self.special_tokens_path),
            max_seq_len=max_seq_len,
        )


@dataclass(frozen=True)
class BuildResult:
    assets: TinyAssets
    reused: bool
    files: list[Path]  # every file of the folder, manifest last


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < _MAX_SEED:
        raise ValueError(f"seed must be an int in [0, 2**62), got {seed!r}.")


@functools.cache
def _bpe_ranks() -> tuple[bytes, ...]:
    return tuple(tokenizer.train_byte_bpe(data.tokenizer_corpus()))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_manifest(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _is_complete(root: Path, manifest: dict[str, Any]) -> bool:
    files = manifest.get("files", {})
    return bool(files) and all(
        (root / name).is_file() and (root / name).stat().st_size == entry["bytes"]
        for name, entry in files.items()
    )


def _write_folder(assets: TinyAssets, vocab: Vocab, seed: int) -> list[Path]:
    """Write every asset file (not the manifest); returns their paths."""
    special_ids = tokenizer.special_token_ids(vocab)
    assets.train_data.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(assets.tokenizer_path, tokenizer.tiktoken_file_text(list(_bpe_ranks())))
    write_text_atomic(assets.special_tokens_path, tokenizer.special_tokens_json(vocab))
    write_text_atomic(assets.train_data, data.records_json(data.instruction_records("train")))
    write_text_atomic(assets.val_data, data.records_json(data.instruction_records("val")))
    written = [
        assets.tokenizer_path,
        assets.special_tokens_path,
        assets.train_data,
        assets.val_data,
    ]
    for checkpoint_dir, dims, model_seed in (
        (assets.teacher_dir, TEACHER_DIMS, 2 * seed),
        (assets.student_dir, STUDENT_DIMS, 2 * seed + 1),
    ):
        written += write_hf_checkpoint(
            checkpoint_dir,
            dims,
            vocab_size=assets.vocab_size,
            seed=model_seed,
            bos_token_id=special_ids["<|begin_of_text|>"],
            eos_token_id=special_ids["<|end_of_text|>"],
        )
    return written


def build_tiny_assets(out_dir: str | Path, *, vocab: Vocab = "small", seed: int = 0) -> BuildResult:
    """:func:`make_tiny_assets`, also saying whether the folder was reused and listing its files."""
    tokenizer.check_vocab(vocab)
    _check_seed(seed)
    root = Path(out_dir)
    assets = TinyAssets.at(root, tokenizer.model_vocab_size(vocab))

    manifest = _read_manifest(root)
    if manifest is not None and manifest.get("format_version") == FORMAT_VERSION:
        if (manifest.get("vocab"), manifest.get("seed")) != (vocab, seed):
            raise ValueError(
                f"out_dir {str(root)!r} already holds tiny assets made with "
                f"vocab={manifest.get('vocab')!r}, seed={manifest.get('seed')!r}, not "
                f"vocab={vocab!r}, seed={seed}; pass another out_dir or delete that folder."
            )
        if _is_complete(root, manifest):
            files = [root / name for name in manifest["files"]] + [root / MANIFEST_FILE]
            return BuildResult(assets=assets, reused=True, files=files)

    root.mkdir(parents=True, exist_ok=True)
    # The manifest is removed first and written last: an interrupted build is never reused.
    (root / MANIFEST_FILE).unlink(missing_ok=True)
    written = _write_folder(assets, vocab, seed)
    manifest = {
        "format_version": FORMAT_VERSION,
        "vocab": vocab,
        "seed": seed,
        "vocab_size": assets.vocab_size,
        "special_tokens": tokenizer.special_token_ids(vocab),
        "files": {
            path.relative_to(root).as_posix(): {
                "bytes": path.stat().st_size,
                "sha256": _sha256(path),
            }
            for path in written
        },
    }
    write_text_atomic(root / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")
    return BuildResult(assets=assets, reused=False, files=[*written, root / MANIFEST_FILE])


def make_tiny_assets(out_dir: str | Path, *, vocab: Vocab = "small", seed: int = 0) -> TinyAssets:
    """Create (or reuse) the tiny offline assets under ``out_dir``; see the module docstring.

    Args:
        out_dir: folder to fill (created if missing).
        vocab: ``"small"`` (512-row models, specials right after the 496 BPE ranks) or
            ``"llama3"`` (128,256-row models, canonical Llama-3 special-token ids).
        seed: non-negative int; controls the teacher and student weights.

    Returns:
        TinyAssets with the paths and the model vocabulary size.

    Deterministic (same arguments -> byte-identical files) and takes about a second (small) to a
    few seconds (llama3: about 200 MB of fp32 embeddings).
    """
    return build_tiny_assets(out_dir, vocab=vocab, seed=seed).assets
