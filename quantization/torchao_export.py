"""Export a student trained with a torchao QAT quantiser as torchao's converted model.

``kdtune export CHECKPOINT --format torchao [--out DIR]``

For a step checkpoint of a run whose ``quantizer:`` was torchao's
``Int8DynActInt4WeightQATQuantizer`` or ``Int4WeightOnlyQATQuantizer`` (as
``torchtune.training.quantization.*``), in order:

1. the quantiser and the training dtype are read from the checkpoint's ``manifest.json`` (the
   run's fingerprints record its ``quantizer`` node and ``dtype``): a checkpoint without a
   torchao quantiser is refused here, before any weight is read;
2. the student is rebuilt from ``model/config.json`` (as the GGUF export reads it), prepared
   with that quantiser (the fake-quantised model the run trained), and given the checkpoint's
   weights;
3. the quantiser's ``convert`` swaps each fake-quantised linear for torchao's quantised one
   (8da4w: ``Int8DynActInt4WeightLinear``, int4 values stored one per int8 with fp32 group
   scales; 4w: ``WeightOnlyInt4Linear``, int4 packed two per byte for the CPU kernel with bf16
   scales and zeros);
4. the converted model's ``state_dict`` is saved with ``torch.save`` (torchao's documented
   serialisation: rebuild the quantised skeleton, then ``load_state_dict``;
   :func:`load_torchao_export` does that) to ``<checkpoint>/torchao/model.pt``, beside
   ``config.json`` and the tokenizer files of ``model/`` and ``torchao.json``: the quantiser
   node, group size, precision, the file's size and the size of the same weights in bf16.

Precision: 8da4w converts in the training dtype (its converted forward then gives the
fake-quantised forward's logits). 4w converts in bf16 whatever the training dtype: torchao's
int4 weight-only kernels (``_weight_int4pack_mm_for_cpu`` on CPU, tinygemm on CUDA) take bf16
scales and an input of the same dtype. The packed int4 layout is the CPU kernel's: load the
file on CPU (CUDA's tinygemm packs differently).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchtune.training.quantization import (
    Int4WeightOnlyQATQuantizer,
    Int8DynActInt4WeightQATQuantizer,
)

from kdtune.models.hf_llama import hf_to_torchtune, llama_from_hf_config, read_hf_state_dict
from kdtune.quantization.gguf_export import MODEL_DIRNAME, ExportError
from kdtune.quantization.qat import build_quantizer, prepare_student

TORCHAO_DIRNAME = "torchao"
"""Where a checkpoint's torchao export goes by default: ``<checkpoint>/torchao/``."""

WEIGHTS_FILENAME = "model.pt"
"""The converted model's ``state_dict`` (``torch.save``)."""

INFO_FILENAME = "torchao.json"
"""What :func:`load_torchao_export` needs to rebuild the skeleton, and the sizes."""

MANIFEST_FILENAME = "manifest.json"
"""A step checkpoint's manifest (``kdtune.training.checkpoint.layout.MANIFEST_FILENAME``, one
floor up; tests/test_torchao_export.py checks they agree)."""

TORCHAO_QUANTIZERS: tuple[type, ...] = (
    Int8DynActInt4WeightQATQuantizer,
    Int4WeightOnlyQATQuantizer,
)
"""The QAT quantisers whose ``convert`` this export runs."""

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_NON_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".pt")


@dataclass(frozen=True)
class TorchaoExportResult:
    path: Path
    """The saved ``state_dict`` file."""
    size_bytes: int
    bf16_bytes: int
    """The same model's weights stored as bf16 (2 bytes per element, before conversion)."""
    info: dict[str, Any]
    """What ``torchao.json`` holds."""


# ---------------------------------------------------------------------------------------------
# What the checkpoint was trained with


def training_record(source: str | Path) -> tuple[dict[str, Any], str]:
    """The ``quantizer`` node and ``dtype`` of the run that saved ``source`` (a checkpoint).

    Raises:
        ExportError: ``source`` has no ``manifest.json`` / ``model/``, or its run named no
            torchao quantiser (one line naming the file and the fix). Reads no weights.
    """
    source = Path(source)
    manifest_path = source / MANIFEST_FILENAME
    if not manifest_path.is_file() or not (source / MODEL_DIRNAME / "config.json").is_file():
        raise ExportError(
            f"{source}: no {MANIFEST_FILENAME} and {MODEL_DIRNAME}/config.json; --format torchao "
            "needs a step checkpoint (checkpoints/step_N) of a run with a torchao quantizer"
        )
    config = json.loads(manifest_path.read_text()).get("fingerprints", {}).get("config", {})
    node = config.get("quantizer")
    path = node.get("_component_") if isinstance(node, dict) else None
    names = ", ".join(c.__name__ for c in TORCHAO_QUANTIZERS)
    if path is None:
        raise ExportError(
            f"{manifest_path}: the run had no quantizer; --format torchao converts a student "
            f"trained with torchtune.training.quantization.{{{names}}} (export it with "
            "--format gguf, or train with one of those quantizers)"
        )
    if not path.endswith(tuple(f".{c.__name__}" for c in TORCHAO_QUANTIZERS)):
        raise ExportError(
            f"{manifest_path}: quantizer {path} is not a torchao quantiser ({names}); "
            "a GGUF quantiser's student is exported with --format gguf"
        )
    return node, str(config.get("dtype") or "fp32")


def torchao_quantizer(node: dict[str, Any]) -> Any:
    """The quantiser ``node`` builds (:func:`~kdtune.quantization.qat.build_quantizer`)."""
    try:
        quantizer = build_quantizer(node)
    except ValueError as error:
        raise ExportError(str(error)) from None
    if not isinstance(quantizer, TORCHAO_QUANTIZERS):
        raise ExportError(f"quantizer {node.get('_component_')} has no torchao convert step")
    return quantizer


def export_dtype(quantizer: Any, training_dtype: str) -> torch.dtype:
    """The converted model's compute dtype: the training dtype, bf16 for int4 weight-only."""
    if isinstance(quantizer, Int4WeightOnlyQATQuantizer):
        return torch.bfloat16  # the int4 kernels' scales and input dtype
    if training_dtype not in _DTYPES:
        raise ExportError(f"dtype {training_dtype!r} unknown; expected one of {list(_DTYPES)}")
    return _DTYPES[training_dtype]


# ---------------------------------------------------------------------------------------------
# Models


def prepared_student(
    config: dict[str, Any], quantizer: Any, dtype: torch.dtype, weights: dict[str, torch.Tensor]
) -> nn.Module:
    """The fake-quantised student the run trained: built from the HF ``config``, prepared with
    ``quantizer`` in ``dtype``, then given ``weights`` (HF names, as in ``model/``); eval mode."""
    model = llama_from_hf_config(config).to(dtype)
    model = prepare_student(model, quantizer, dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in hf_to_torchtune(weights, config).items()})
    return model.eval()


def bf16_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters and buffers stored as bf16 (2 per element)."""
    return 2 * sum(t.numel() for t in model.state_dict().values())


def converted_student(prepared: nn.Module, quantizer: Any) -> nn.Module:
    """``quantizer.convert(prepared)`` (in place): torchao's quantised linear layers."""
    converted = quantizer.convert(prepared)
    return (converted if converted is not None else prepared).eval()


def load_torchao_export(folder: str | Path) -> nn.Module:
    """The converted model saved in ``folder`` (a ``torchao/`` export), eval mode.

    As torchao documents: rebuild the quantised skeleton (config, prepare, convert), then load
    the saved ``state_dict`` (plain tensors: ``weights_only=True``) into it.
    """
    folder = Path(folder)
    info = json.loads((folder / INFO_FILENAME).read_text())
    config = json.loads((folder / "config.json").read_text())
    quantizer = torchao_quantizer(info["quantizer"])
    dtype = _DTYPES[info["precision"]]
    skeleton = llama_from_hf_config(config).to(dtype)
    skeleton = converted_student(prepare_student(skeleton, quantizer, dtype), quantizer)
    state = torch.load(folder / WEIGHTS_FILENAME, map_location="cpu", weights_only=True)
    skeleton.load_state_dict(state, assign=True)
    return skeleton.eval()


# ---------------------------------------------------------------------------------------------
# Writing


def _copy_model_files(model_dir: Path, out: Path) -> None:
    """``config.json``, the tokenizer and other small files of ``model/`` (not the weights)."""
    for path in sorted(model_dir.iterdir()):
        if path.is_file() and not path.name.endswith(_NON_WEIGHT_SUFFIXES):
            shutil.copy2(path, out / path.name)


def _name_of(dtype: torch.dtype) -> str:
    return next(name for name, value in _DTYPES.items() if value == dtype)


def export_torchao(source: str | Path, out: str | Path | None = None) -> TorchaoExportResult:
    """Convert ``source``'s student with its torchao quantiser and save it (module docstring).

    Args:
        source: a step checkpoint (``checkpoints/step_N``) of a run with a torchao quantiser.
        out: the folder to write; default ``<source>/torchao``. Written as ``<out>.partial``,
            then renamed (an existing ``out`` is replaced).

    Raises:
        ExportError: not such a checkpoint (before any weight is read).
    """
    source = Path(source)
    node, training_dtype = training_record(source)
    quantizer = torchao_quantizer(node)
    dtype = export_dtype(quantizer, training_dtype)
    model_dir = source / MODEL_DIRNAME
    config = json.loads((model_dir / "config.json").read_text())

    model = prepared_student(config, quantizer, dtype, read_hf_state_dict(model_dir))
    reference_bytes = bf16_bytes(model)
    model = converted_student(model, quantizer)

    out = Path(out) if out is not None else source / TORCHAO_DIRNAME
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    _copy_model_files(model_dir, partial)
    torch.save(model.state_dict(), partial / WEIGHTS_FILENAME)
    size = (partial / WEIGHTS_FILENAME).stat().st_size
    info = {
        "quantizer": node,
        "groupsize": int(quantizer.groupsize),
        "precision": _name_of(dtype),
        "training_dtype": training_dtype,
        "file": WEIGHTS_FILENAME,
        "size_bytes": size,
        "bf16_bytes": reference_bytes,
        "size_vs_bf16": round(size / reference_bytes, 4),
        "load": "kdtune.quantization.torchao_export.load_torchao_export(folder)",
    }
    (partial / INFO_FILENAME).write_text(json.dumps(info, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)
    return TorchaoExportResult(out / WEIGHTS_FILENAME, size, reference_bytes, info)


__all__ = [
    "TORCHAO_QUANTIZERS",
    "TorchaoExportResult",
    "export_torchao",
    "load_torchao_export",
    "training_record",
]
