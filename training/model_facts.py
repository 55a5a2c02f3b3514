"""Facts about a model and a tokenizer that the checks compare, read without weights.

:func:`describe_model` builds a model on the meta device (no memory, no weights) and reads its
vocabulary, size, context and the architecture a checkpoint's ``config.json`` must match.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torchtune.modules.peft import get_adapter_params

from kdtune.training.config.errors import ConfigError
from kdtune.training.config.nodes import is_int


@dataclass(frozen=True)
class ModelFacts:
    """What the checks need to know about a model: its vocabulary, its size, its context
    (``max_seq_len``; None: unknown) and its architecture keyed by the Hugging Face
    ``config.json`` field that must match it (:data:`HF_ARCHITECTURE_FIELDS`)."""

    vocab_size: int
    num_params: int
    max_seq_len: int | None = None
    architecture: dict[str, int] = field(default_factory=dict)
    has_adapters: bool = False  # LoRA/DoRA parameters
    quantizer_problem: str | None = None  # why the quantizer cannot prepare this model


HF_ARCHITECTURE_FIELDS = (
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_size",
    "intermediate_size",
    "head_dim",
    "vocab_size",
)
"""``config.json`` fields compared with the model a builder makes (a field absent from the file
is not compared)."""


def model_architecture(model: nn.Module) -> dict[str, int]:
    """The :data:`HF_ARCHITECTURE_FIELDS` of a torchtune decoder (those it has), read from its
    modules' shapes (works on the meta device)."""
    layers = getattr(model, "layers", None)
    if layers is None or len(layers) == 0:
        return {}
    attn, mlp = getattr(layers[0], "attn", None), getattr(layers[0], "mlp", None)
    found: dict[str, Any] = {
        "num_hidden_layers": len(layers),
        "num_attention_heads": getattr(attn, "num_heads", None),
        "num_key_value_heads": getattr(attn, "num_kv_heads", None),
        "hidden_size": getattr(attn, "embed_dim", None),
        "intermediate_size": getattr(
            getattr(getattr(mlp, "w1", None), "weight", None), "shape", [None]
        )[0],
        "head_dim": getattr(attn, "head_dim", None),
        "vocab_size": model_vocab_size(model),
    }
    return {name: int(value) for name, value in found.items() if is_int(value)}


def model_vocab_size(model: nn.Module) -> int:
    """Rows of the output projection (the logits' last dimension) of a torchtune decoder."""
    output = getattr(model, "output", None)
    weight = getattr(output, "weight", None)
    if isinstance(weight, torch.Tensor):
        return int(weight.shape[0])
    tied = getattr(output, "tied_module", None)  # TiedLinear: the embedding's rows
    if tied is not None:
        return int(tied.weight.shape[0])
    embeddings = getattr(model, "tok_embeddings", None)
    if embeddings is not None:
        return int(embeddings.weight.shape[0])
    raise ConfigError(f"cannot find the vocabulary size of {type(model).__name__}")


def describe_model(node: DictConfig, quantizer: Any = None) -> ModelFacts:
    """Build the model of a config node on the meta device (no memory, no weights) and describe
    it; with a QAT ``quantizer`` (:mod:`kdtune.quantization.qat`), also try preparing it there
    (layer widths against the group size, LoRA options) and keep the reason it cannot be."""
    from torchtune import config

    from kdtune.quantization.qat import prepare_student

    quantizer_problem = None
    with torch.device("meta"):
        model = config.instantiate(node)
        if quantizer is not None:
            try:
                prepare_student(model, quantizer)
            except ValueError as error:
                quantizer_problem = str(error)
    num_params = sum(p.numel() for p in model.parameters())
    context = getattr(model, "max_seq_len", None)
    facts = ModelFacts(
        vocab_size=model_vocab_size(model),
        num_params=num_params,
        max_seq_len=int(context) if is_int(context) else None,
        architecture=model_architecture(model),
        has_adapters=bool(get_adapter_params(model)),
        quantizer_problem=quantizer_problem,
    )
    del model
    return facts


def tokenizer_max_id(tokenizer: Any) -> int:
    """The largest token id a tokenizer can produce from text (special tokens included).

    Works for tiktoken-based tokenizers (Llama 3: ``vocab_size`` counts every id) and for BPE
    tokenizers with an ``encoder`` and ``special_tokens`` mapping (Qwen2). The image
    placeholder (``tokenizer.image_id``, Llama 3's ``<|image|>`` = 128256, one past the text
    models' 128,256 rows) is left out: it is only emitted for image content, never for text.
    """
    special = getattr(tokenizer, "special_tokens", None)
    special_ids = set(special.values()) if isinstance(special, dict) else set()
    special_ids.discard(getattr(tokenizer, "image_id", None))
    encoder = getattr(tokenizer, "encoder", None)
    if isinstance(encoder, dict) and encoder:
        return int(max([*encoder.values(), *special_ids]))
    base_vocab_size = getattr(tokenizer, "base_vocab_size", None)
    if is_int(base_vocab_size):
        return int(max([base_vocab_size - 1, *special_ids]))
    vocab_size = getattr(tokenizer, "vocab_size", None)
    if is_int(vocab_size):
        return int(vocab_size - 1)
    raise ConfigError(
        f"tokenizer: cannot tell the largest id of {type(tokenizer).__name__} (it has neither "
        "vocab_size nor encoder); use a torchtune tokenizer"
    )
