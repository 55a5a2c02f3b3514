"""The Hugging Face side of a step checkpoint: ``model/`` (transformers) and ``adapter/`` (PEFT).

``model/`` is the student as a transformers model folder: its weights converted, sharded and
indexed by torchtune's ``FullModelHFCheckpointer`` (the conversion of the checkpointer's
``model_type``), and the other files of the student's ``checkpoint_dir`` (``config.json``,
tokenizer, ``generation_config.json``). It holds no adapter file: transformers applies any
``adapter_config.json`` it finds in a model folder when peft is installed, which on top of merged
weights would count a LoRA update twice.

``adapter/`` holds a LoRA/DoRA student's adapters in PEFT's format: ``adapter_model.safetensors``
and an ``adapter_config.json`` whose ``base_model_name_or_path`` is the student's original
``checkpoint_dir`` (the frozen base the adapters were trained on), so
``peft.AutoPeftModelForCausalLM.from_pretrained(adapter/)`` rebuilds the student.

Every file written is made 0644 (safetensors creates its files 0600).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor
from torchtune import training
from torchtune.models import convert_weights
from torchtune.models.gemma2._convert_weights import gemma2_tune_to_hf
from torchtune.models.qwen2._convert_weights import qwen2_tune_to_hf
from torchtune.training.checkpointing._utils import ModelType

PEFT_WEIGHTS_FILENAME = "adapter_model.safetensors"
PEFT_CONFIG_FILENAME = "adapter_config.json"
FILE_MODE = 0o644

_NO_PEFT_EXPORT = {
    ModelType.PHI3_MINI,  # fused qkv / gate_up projections: no one-to-one module mapping
    ModelType.PHI4,
    ModelType.LLAMA3_VISION,
    ModelType.REWARD,
    ModelType.CLIP_TEXT,
    ModelType.T5_ENCODER,
}
_ADAPTER_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_a\.weight|lora_b\.weight|magnitude)$")
_PEFT_PART = {
    "lora_a.weight": "lora_A.weight",
    "lora_b.weight": "lora_B.weight",
    "magnitude": "lora_magnitude_vector",
}


def make_readable(folder: Path) -> None:
    """Give every file under ``folder`` mode 0644 (readable by all, like any exported model)."""
    for path in folder.rglob("*"):
        if path.is_file():
            os.chmod(path, FILE_MODE)


def write_model_folder(checkpointer: Any, state_dict: dict[str, Tensor], folder: Path) -> None:
    """Write ``state_dict`` (torchtune keys) as the Hugging Face model folder ``folder``.

    torchtune 0.6.1's ``FullModelHFCheckpointer.save_checkpoint`` always writes to
    ``<its output_dir>/epoch_<epoch>``; a shallow copy pointed at a scratch folder next to
    ``folder`` reuses its conversion, shard layout (its weight map from ``load_checkpoint``) and
    copy of the other checkpoint files, and the result is renamed to ``folder``. Its info
    messages (which name the scratch folder) are muted; the caller reports the final path.
    """
    if not hasattr(checkpointer, "_output_dir"):
        raise TypeError(
            f"{type(checkpointer).__name__} has no _output_dir; the student checkpointer must be "
            "torchtune.training.FullModelHFCheckpointer (torchtune 0.6.x)"
        )
    scratch = folder.with_name(f".{folder.name}.writing")
    staged = copy.copy(checkpointer)
    staged._output_dir = scratch
    torchtune_log = logging.getLogger("torchtune.utils._logging")
    level = torchtune_log.level
    torchtune_log.setLevel(logging.WARNING)
    try:
        staged.save_checkpoint({training.MODEL_KEY: state_dict}, epoch=0)
    finally:
        torchtune_log.setLevel(level)
    os.replace(scratch / "epoch_0", folder)
    scratch.rmdir()
    make_readable(folder)


def check_peft_export(checkpointer: Any) -> None:
    """Raise before training when a LoRA/DoRA student's adapters cannot be exported for PEFT.

    Raises:
        ValueError: ``checkpointer.model_type`` has no one-to-one HF module mapping.
    """
    _tune_to_hf(checkpointer)


def _tune_to_hf(checkpointer: Any) -> Callable[..., dict[str, Tensor]]:
    """torchtune's tune-to-HF weight conversion for the checkpointer's model type (the one its
    ``save_checkpoint`` applies to the model weights)."""
    model_type = checkpointer._model_type
    if model_type in _NO_PEFT_EXPORT:
        raise ValueError(
            f"checkpointer.model_type = {model_type.name}: kdtune cannot export LoRA/DoRA "
            "adapters of this model type for PEFT; use a full-parameter student (a non-lora "
            "model builder)"
        )
    if model_type == ModelType.QWEN2:
        return qwen2_tune_to_hf
    if model_type == ModelType.GEMMA2:
        return gemma2_tune_to_hf
    return convert_weights.tune_to_hf


def peft_adapter_weights(
    adapters: dict[str, Tensor], checkpointer: Any
) -> tuple[dict[str, Tensor], list[str]]:
    """Adapters in PEFT's keys and layout, and the HF names of the modules they adapt.

    A ``lora_b`` ``[out, r]`` (and a DoRA ``magnitude`` ``[out]``) indexes the output rows of
    its module's weight ``[out, in]``, so it goes through the same tune-to-HF conversion as that
    weight (the model type's own; ``dim`` = its column count): Llama-family types permute q/k
    rows into HF's RoPE layout, Qwen2 does not. torchtune 0.6.1's
    ``tune_to_peft_adapter_weights`` applies Llama's permutation to every type (wrong for Qwen2)
    and leaves DoRA magnitudes unpermuted. A ``lora_a`` ``[r, in]`` keeps its layout (no model
    type reorders input columns).

    Args:
        adapters: torchtune adapter keys (``layers.0.attn.q_proj.lora_a.weight``, ...).
        checkpointer: the student's ``FullModelHFCheckpointer`` (model type, ``config.json``).

    Raises:
        ValueError: an adapter key of an unknown form, or an unsupported model type.
    """
    convert = _tune_to_hf(checkpointer)
    hf_config = checkpointer._config
    heads = {
        "num_heads": hf_config["num_attention_heads"],
        "num_kv_heads": hf_config["num_key_value_heads"],
        "head_dim": hf_config.get("head_dim")
        or hf_config["hidden_size"] // hf_config["num_attention_heads"],
    }

    def as_module_weight(module: str, tensor: Tensor) -> tuple[str, Tensor]:
        matrix = tensor.unsqueeze(1) if tensor.dim() == 1 else tensor
        converted = convert({f"{module}.weight": matrix}, dim=matrix.shape[1], **heads)
        ((key, value),) = converted.items()
        return key.removesuffix(".weight"), value.reshape(tensor.shape).contiguous()

    parts: dict[str, dict[str, Tensor]] = {}
    for key, tensor in adapters.items():
        match = _ADAPTER_KEY.match(key)
        if match is None:
            raise ValueError(f"unexpected adapter weight {key!r}: not a LoRA/DoRA parameter")
        parts.setdefault(match["module"], {})[match["part"]] = tensor
    weights: dict[str, Tensor] = {}
    hf_modules = []
    for module, tensors in parts.items():
        hf_module, _ = as_module_weight(module, tensors["lora_b.weight"])
        hf_modules.append(hf_module)
        for part, tensor in tensors.items():
            if part != "lora_a.weight":  # indexes output rows: laid out as the module's weight
                _, tensor = as_module_weight(module, tensor)
            weights[f"base_model.model.{hf_module}.{_PEFT_PART[part]}"] = tensor.contiguous()
    return weights, hf_modules


def peft_adapter_config(
    *,
    base_model: Path,
    hf_modules: list[str],
    rank: int,
    alpha: float,
    dropout: float,
    use_dora: bool,
) -> dict[str, Any]:
    """A complete PEFT ``LoraConfig`` (as saved to ``adapter_config.json``) of a torchtune adapter.

    torchtune's adapter is PEFT's plain LoRA: scaling ``alpha / rank`` (no rsLoRA), no trained
    bias, weights stored ``[out, in]``; it adapts every layer's module of each name.
    """
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_model),
        "revision": None,
        "inference_mode": True,
        "r": rank,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": dropout,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in hf_modules}),
        "use_dora": use_dora,
        "use_rslora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def write_adapter_folder(
    checkpointer: Any, adapters: dict[str, Tensor], lora: dict[str, Any], folder: Path
) -> None:
    """Write ``adapters`` (torchtune keys) as the PEFT adapter folder ``folder``.

    Args:
        lora: ``r``, ``lora_alpha``, ``lora_dropout``, ``use_dora`` of the student.
    """
    weights, hf_modules = peft_adapter_weights(adapters, checkpointer)
    config = peft_adapter_config(
        base_model=Path(checkpointer._checkpoint_dir).resolve(),
        hf_modules=hf_modules,
        rank=lora["r"],
        alpha=lora["lora_alpha"],
        dropout=lora["lora_dropout"],
        use_dora=lora["use_dora"],
    )
    folder.mkdir(exist_ok=True)
    save_file(weights, str(folder / PEFT_WEIGHTS_FILENAME), metadata={"format": "pt"})
    (folder / PEFT_CONFIG_FILENAME).write_text(json.dumps(config, indent=2) + "\n")
    make_readable(folder)
