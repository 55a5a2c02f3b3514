"""Deterministic tiny Llama-3 weights, written as Hugging Face checkpoints.

Weights are drawn from a ``torch.Generator`` seeded per model, in the (fixed) order of the
torchtune state dict, converted with torchtune's ``convert_weights.tune_to_hf`` and saved in fp32
safetensors. fp32 keeps the files exact: what torchtune's ``FullModelHFCheckpointer`` loads is
bit-identical to what was drawn, and tests can compare fp32 numerics without a bf16 round trip.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor
from torchtune.models.convert_weights import tune_to_hf
from torchtune.models.llama3 import llama3

from kdtune.assets.models import TinyLlamaDims

CHECKPOINT_DTYPE = torch.float32
CHECKPOINT_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def _init_std(name: str, shape: torch.Size, dims: TinyLlamaDims) -> float:
    """Standard deviation of the normal init of one weight (fan-in scaled; see below)."""
    if name == "tok_embeddings.weight":
        return 1.0  # unit-RMS residual stream, like the RMSNorm outputs it is added to
    fan_in = shape[-1]
    if name.endswith(("attn.output_proj.weight", "mlp.w2.weight")):
        # Residual branches are damped so the stream stays near unit scale through the layers.
        return 1.0 / math.sqrt(fan_in * 2 * dims.num_layers)
    return 1.0 / math.sqrt(fan_in)


def init_tune_state_dict(
    dims: TinyLlamaDims, vocab_size: int, generator: torch.Generator
) -> dict[str, Tensor]:
    """A torchtune-format state dict for ``llama3(vocab_size, **dims)``, drawn from ``generator``.

    RMSNorm scales are 1; every other weight is N(0, std²) with a fan-in std (``1/sqrt(fan_in)``),
    so q/k/v, MLP and logits all have about unit scale: attention scores spread over about one
    unit (attention is not uniform, so RoPE and the q/k layout matter), and logits have a std of
    about 1 (distributions neither uniform nor one-hot; teacher and student, drawn from different
    seeds, disagree by a sane, non-trivial KL). Tensors are drawn in state-dict order.
    """
    with torch.device("meta"):
        reference = llama3(vocab_size=vocab_size, **dims.builder_kwargs())
    state_dict = {}
    for name, meta_tensor in reference.state_dict().items():
        if name.endswith("scale"):
            tensor = torch.ones(meta_tensor.shape, dtype=CHECKPOINT_DTYPE)
        else:
            tensor = torch.empty(meta_tensor.shape, dtype=CHECKPOINT_DTYPE)
            tensor.normal_(0.0, _init_std(name, meta_tensor.shape, dims), generator=generator)
        state_dict[name] = tensor
    return state_dict


def write_hf_checkpoint(
    out_dir: Path,
    dims: TinyLlamaDims,
    *,
    vocab_size: int,
    seed: int,
    bos_token_id: int,
    eos_token_id: int,
) -> list[Path]:
    """Write ``out_dir/{config.json, model.safetensors}``; returns the two paths.

    Each file is written to a temporary name and renamed, so a reader never sees a partial file.
    """
    generator = torch.Generator().manual_seed(seed)
    tune_state_dict = init_tune_state_dict(dims, vocab_size, generator)
    hf_state_dict = tune_to_hf(
        tune_state_dict,
        num_heads=dims.num_heads,
        num_kv_heads=dims.num_kv_heads,
        dim=dims.embed_dim,
        head_dim=dims.head_dim,
    )
    hf_state_dict = {key: value.contiguous() for key, value in hf_state_dict.items()}
    config = dims.hf_config(
        vocab_size=vocab_size,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        torch_dtype=str(CHECKPOINT_DTYPE).removeprefix("torch."),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = out_dir / CONFIG_FILE
    weights_path = out_dir / CHECKPOINT_FILE
    write_text_atomic(config_path, json.dumps(config, indent=2) + "\n")
    tmp_weights = _tmp_name(weights_path)
    save_file(hf_state_dict, str(tmp_weights), metadata={"format": "pt"})
    tmp_weights.replace(weights_path)
    return [config_path, weights_path]


def _tmp_name(path: Path) -> Path:
    # Per-process name: two processes building the same folder never write the same temp file.
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file and rename it onto ``path`` (readers see all or none)."""
    tmp = _tmp_name(path)
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def read_hf_config(checkpoint_dir: Path) -> dict[str, Any]:
    return json.loads((Path(checkpoint_dir) / CONFIG_FILE).read_text(encoding="utf-8"))
