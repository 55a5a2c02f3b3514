"""Quantisation-aware training of a student: the ``quantizer:`` component, torchtune's way.

A config names a quantiser with a ``prepare(model) -> model`` / ``convert(model) -> model`` pair,
as torchtune's QAT recipes do::

    quantizer:
      _component_: torchtune.training.quantization.Int8DynActInt4WeightQATQuantizer
      groupsize: 256
    fake_quant_after_n_steps: 1000      # optional: train unquantised first

Supported (:data:`SUPPORTED`): torchao's ``Int8DynActInt4WeightQATQuantizer`` and
``Int4WeightOnlyQATQuantizer`` (re-exported by ``torchtune.training.quantization``), and kdtune's
:class:`GGUFQ8_0QATQuantizer` / :class:`GGUFQ4_0QATQuantizer`, whose fake quantisation is
exactly llama.cpp's ``Q8_0`` / ``Q4_0`` (:mod:`kdtune.quantization.gguf_fake_quant`), so the
student ``kdtune export --format gguf --quant q4_0`` writes is the one that was trained.

The recipe calls, in order: :func:`build_quantizer` (with the config, before any model is built),
:func:`prepare_student` (on the student built on the meta device, before sharding and before its
weights are loaded: it checks every layer width and swaps in the fake-quantised modules, keeping
every parameter name), then :meth:`FakeQuantSchedule.apply` at the top of every step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchtune.modules import TiedLinear
from torchtune.modules.peft import DoRALinear, LoRALinear
from torchtune.training.quantization import (
    Int4WeightOnlyQATQuantizer,
    Int8DynActInt4WeightQATQuantizer,
)

from kdtune.quantization.gguf_fake_quant import (
    BLOCK_SIZE,
    GGUFQuantType,
    gguf_fake_quantize,
    parse_quant_type,
)

# ---------------------------------------------------------------------------------------------
# Fake-quantised modules (parameter names unchanged, so checkpoints load and save as before)


class _FakeQuant:
    """Mixin: ``qtype``, ``layer_name``, ``fake_quant_enabled``; :meth:`quantized` applies it."""

    qtype: GGUFQuantType
    layer_name: str
    fake_quant_enabled: bool

    def _init_fake_quant(self, qtype: GGUFQuantType, layer_name: str) -> None:
        self.qtype, self.layer_name, self.fake_quant_enabled = qtype, layer_name, True

    def quantized(self, weight: Tensor, dtype: torch.dtype) -> Tensor:
        """``weight`` as llama.cpp computes with it, in ``dtype`` (the layer's compute dtype), or
        as is while disabled.

        An output layer (:func:`_quantize_head_once_per_forward`) keeps the result for the rest
        of the model's forward: in chunked-output mode it is called once per chunk with the same
        weight, which is quantised once and shares one straight-through gradient node."""
        if not self.fake_quant_enabled:
            return weight
        cached = self.__dict__.get("_quantized_this_forward")
        if (
            cached is not None
            and cached[0] is weight
            and cached[1] == weight._version
            and cached[2].dtype == dtype
        ):
            return cached[2]
        values = gguf_fake_quantize(weight, self.qtype, self.layer_name, dtype)
        if "_quantized_this_forward" in self.__dict__:
            self.__dict__["_quantized_this_forward"] = (weight, weight._version, values)
        return values


class GGUFFakeQuantLinear(nn.Linear, _FakeQuant):
    """``nn.Linear`` computing with its block-quantised weight (cast to the input's dtype)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.quantized(self.weight, x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, qtype={self.qtype.value}"


class GGUFFakeQuantEmbedding(nn.Embedding, _FakeQuant):
    """``nn.Embedding`` returning block-quantised rows: blocks run along a row, so quantising
    the looked-up rows equals looking up the quantised table (and costs only those rows)."""

    def forward(self, tokens: Tensor) -> Tensor:
        rows = super().forward(tokens)
        return self.quantized(rows, rows.dtype)


class GGUFFakeQuantTiedProjection(nn.Module, _FakeQuant):
    """Replaces ``TiedLinear.linear``: ``forward(x, weight)`` with the tied weight quantised."""

    def __init__(self, qtype: GGUFQuantType, layer_name: str) -> None:
        super().__init__()
        self._init_fake_quant(qtype, layer_name)

    def forward(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.linear(x, self.quantized(weight, x.dtype))


class GGUFFakeQuantLoRALinear(LoRALinear, _FakeQuant):
    """A LoRA layer computing with ``quantise(W + (alpha / rank) * B @ A)``: the merged weight
    the export writes. Needs ``lora_dropout = 0`` (dropout of the adapter's input has no merged
    form); the frozen ``W`` and both adapters get the straight-through gradient."""

    def merged_weight(self) -> Tensor:
        """``W + (alpha / rank) * B @ A`` ``[out, in]``, in torchtune's ``get_merged_lora_ckpt``
        order (``(alpha / rank) * B`` first): in fp32, the checkpoint's merged ``model/`` weight
        bit for bit, so the export quantises exactly what was trained."""
        return self.weight + (self.alpha / self.rank) * self.lora_b.weight @ self.lora_a.weight

    def forward(self, x: Tensor) -> Tensor:
        if self.disabled or not self.fake_quant_enabled:
            return super().forward(x)
        weight = self.quantized(self.merged_weight(), x.dtype)
        return F.linear(x, weight, self.bias if self.use_bias else None)


def _modules_outside_adapters(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``named_modules`` without the insides of LoRA/DoRA layers (their adapters are part of the
    merged weight, never quantised on their own)."""
    adapters: list[str] = []
    kept = []
    for name, module in model.named_modules():
        if any(name.startswith(f"{prefix}.") for prefix in adapters):
            continue
        if isinstance(module, LoRALinear | DoRALinear):
            adapters.append(name)
        kept.append((name, module))
    return kept


def _to_fake_quant(module: nn.Module, cls: type, qtype: GGUFQuantType, name: str) -> None:
    """Give ``module`` the fake-quantised subclass's forward in place: same object, parameters
    and names, so whatever holds it (a ``TiedLinear``, hooks, FSDP's later wrapping) still does."""
    module.__class__ = cls
    module._init_fake_quant(qtype, name)


def _from_fake_quant(module: nn.Module, cls: type) -> None:
    module.__class__ = cls
    for attribute in ("qtype", "layer_name", "fake_quant_enabled", "_quantized_this_forward"):
        module.__dict__.pop(attribute, None)


def _lora_to_fake_quant(lora: LoRALinear, qtype: GGUFQuantType, name: str) -> None:
    dropout = getattr(lora.dropout, "p", 0.0)
    if dropout:
        raise ValueError(
            f"{name}: lora_dropout {dropout} with GGUF fake quantisation; set "
            "model.lora_dropout=0.0 (the merged quantised weight has no dropout)"
        )
    if lora._quantize_base:
        raise ValueError(f"{name}: an NF4 (QLoRA) base cannot also be GGUF fake-quantised")
    _to_fake_quant(lora, GGUFFakeQuantLoRALinear, qtype, name)


def _quantize_head_once_per_forward(model: nn.Module) -> None:
    """Let the output layer's fake quantiser keep its result within one ``model(...)`` call
    (a chunked head calls it per chunk; the vocabulary-sized weight then costs one quantisation,
    not ``num_output_chunks``). A forward pre-hook on ``model`` drops the kept result at every
    call, so no result outlives the forward (and the autograd graph) that made it."""
    output = getattr(model, "output", None)
    head = output.linear if isinstance(output, TiedLinear) else output
    if not isinstance(head, _FakeQuant):
        return
    head.__dict__["_quantized_this_forward"] = None

    def forget(module: nn.Module, args: Any) -> None:
        if "_quantized_this_forward" in head.__dict__:  # not after ``convert``
            head.__dict__["_quantized_this_forward"] = None

    model.register_forward_pre_hook(forget)


# ---------------------------------------------------------------------------------------------
# Quantisers


class GGUFQATQuantizer:
    """Fake quantisation as llama.cpp's ``qtype`` (``prepare``) and its removal (``convert``).

    ``prepare`` swaps every linear layer for :class:`GGUFFakeQuantLinear` (LoRA layers for
    :class:`GGUFFakeQuantLoRALinear`), the token embedding for :class:`GGUFFakeQuantEmbedding`
    and a tied output's projection for :class:`GGUFFakeQuantTiedProjection`, in ``embedding``'s
    type. ``convert`` swaps back: the quantised file is ``kdtune export --format gguf`` of the
    saved checkpoint (it quantises the latent weights exactly as the fake quantiser did).

    Args:
        qtype: ``q8_0`` or ``q4_0`` (the linear layers).
        embedding: the token embedding / output projection: ``q8_0``, ``q4_0``, ``none`` (not
            quantised; export with ``--embedding-quant f16``), or None: what ``kdtune export``
            writes by default (``q8_0`` for both).
    """

    def __init__(self, qtype: str, embedding: str | None = None) -> None:
        self.qtype = parse_quant_type(qtype)
        if embedding is None:
            embedding = GGUFQuantType.Q8_0.value
        self.embedding = None if embedding == "none" else parse_quant_type(embedding)

    @property
    def groupsize(self) -> int:
        return BLOCK_SIZE

    def export_options(self) -> dict[str, str]:
        """``kdtune export`` options that write what this quantiser trained."""
        embedding = self.embedding.value if self.embedding is not None else "f16"
        return {"quant": self.qtype.value, "embedding_quant": embedding}

    def _type_of(self, name: str, module: nn.Module) -> GGUFQuantType | None:
        is_head = name.split(".")[-1] == "output"
        return self.embedding if isinstance(module, nn.Embedding) or is_head else self.qtype

    def prepare(self, model: nn.Module) -> nn.Module:
        check_block_widths(model, BLOCK_SIZE, self)
        for parent_name, parent in _modules_outside_adapters(model):
            if isinstance(parent, LoRALinear | DoRALinear):
                continue  # its adapters are inside the merged weight
            for child_name, child in list(parent.named_children()):
                name = f"{parent_name}.{child_name}" if parent_name else child_name
                qtype = self._type_of(name, child)
                if qtype is None or isinstance(child, _FakeQuant):
                    continue
                if isinstance(child, DoRALinear):
                    raise ValueError(
                        f"{name}: GGUF fake quantisation of DoRA layers is not supported; use LoRA"
                    )
                if isinstance(child, LoRALinear):
                    _lora_to_fake_quant(child, qtype, name)
                elif type(child) is nn.Linear:
                    _to_fake_quant(child, GGUFFakeQuantLinear, qtype, name)
                elif type(child) is nn.Embedding:
                    _to_fake_quant(child, GGUFFakeQuantEmbedding, qtype, name)
        output = getattr(model, "output", None)
        if isinstance(output, TiedLinear) and self.embedding is not None:
            output.linear = GGUFFakeQuantTiedProjection(self.embedding, "output (tied)")
        _quantize_head_once_per_forward(model)
        return model

    def convert(self, model: nn.Module) -> nn.Module:
        for module in model.modules():
            if isinstance(module, GGUFFakeQuantLoRALinear):
                _from_fake_quant(module, LoRALinear)
            elif isinstance(module, GGUFFakeQuantLinear):
                _from_fake_quant(module, nn.Linear)
            elif isinstance(module, GGUFFakeQuantEmbedding):
                _from_fake_quant(module, nn.Embedding)
        output = getattr(model, "output", None)
        if isinstance(output, TiedLinear) and isinstance(output.linear, _FakeQuant):
            from torchtune.modules.tied_linear import Linear

            output.linear = Linear()
        return model


class GGUFQ8_0QATQuantizer(GGUFQATQuantizer):
    """llama.cpp ``Q8_0`` (export with ``--quant q8_0``)."""

    def __init__(self, embedding: str | None = None) -> None:
        super().__init__("q8_0", embedding)


class GGUFQ4_0QATQuantizer(GGUFQATQuantizer):
    """llama.cpp ``Q4_0`` (export with ``--quant q4_0``); the embedding defaults to ``Q8_0``, as
    ``kdtune export`` and ``llama-quantize`` keep it."""

    def __init__(self, embedding: str | None = None) -> None:
        super().__init__("q4_0", embedding)


SUPPORTED: tuple[type, ...] = (
    Int8DynActInt4WeightQATQuantizer,
    Int4WeightOnlyQATQuantizer,
    GGUFQ8_0QATQuantizer,
    GGUFQ4_0QATQuantizer,
)
"""The quantiser classes a ``quantizer:`` node may build."""

SUPPORTED_PATHS = (
    "torchtune.training.quantization.Int8DynActInt4WeightQATQuantizer",
    "torchtune.training.quantization.Int4WeightOnlyQATQuantizer",
    "kdtune.quantization.qat.GGUFQ8_0QATQuantizer",
    "kdtune.quantization.qat.GGUFQ4_0QATQuantizer",
)


def build_quantizer(node: Mapping[str, Any] | None) -> Any | None:
    """The ``quantizer:`` node's quantiser (None for none); a one-line ``ValueError`` naming
    ``quantizer._component_`` for anything but :data:`SUPPORTED`. Cheap: builds no model."""
    if node is None:
        return None
    from omegaconf import DictConfig, OmegaConf
    from torchtune import config as tt_config

    node = node if isinstance(node, DictConfig) else OmegaConf.create(dict(node))
    path = node.get("_component_")
    hint = f"use one of {', '.join(SUPPORTED_PATHS)}"
    try:
        quantizer = tt_config.instantiate(node)
    except Exception as error:  # an unknown dotpath or a bad argument: one line with the cause
        cause = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"quantizer._component_ = {path}: cannot build it ({cause}); {hint}"
        ) from None
    if not isinstance(quantizer, SUPPORTED):
        raise ValueError(
            f"quantizer._component_ = {path} is not a QAT quantiser kdtune trains with; {hint}"
        )
    return quantizer


# ---------------------------------------------------------------------------------------------
# Checks, preparation, schedule


def quantizer_groupsize(quantizer: Any) -> int:
    """Weights per quantisation group along a layer's input (GGUF: 32 per block)."""
    return int(quantizer.groupsize)


def check_block_widths(model: nn.Module, groupsize: int, quantizer: Any = None) -> None:
    """Raise ``ValueError`` naming the first layer whose input width ``groupsize`` does not
    divide (works on a meta-device model: reads shapes only)."""
    what = type(quantizer).__name__ if quantizer is not None else "the quantiser"
    for name, module in _modules_outside_adapters(model):
        if isinstance(module, nn.Linear | LoRALinear):
            width = module.weight.shape[-1]
        elif isinstance(module, nn.Embedding) and isinstance(quantizer, GGUFQATQuantizer):
            if quantizer.embedding is None:
                continue
            width = module.embedding_dim
        else:
            continue
        if width % groupsize:
            raise ValueError(
                f"{name}: input width {width} is not divisible by {what}'s group size "
                f"{groupsize}; choose a group size that divides every layer's width"
            )


def prepare_student(
    model: nn.Module, quantizer: Any | None, dtype: torch.dtype | None = None
) -> nn.Module:
    """Check every layer width against the quantiser's group size, then ``quantizer.prepare``.

    A torchao quantiser computes in ``dtype`` (its ``precision``) and refuses a LoRA student
    (it would quantise the adapters' own linear layers, not the merged weight).

    Call on the student built on the meta device, before sharding and before loading weights
    (parameter names are unchanged, so the checkpointer's state dict loads as before).
    """
    if quantizer is None:
        return model
    if not isinstance(quantizer, GGUFQATQuantizer):
        adapter = next(
            (n for n, m in model.named_modules() if isinstance(m, LoRALinear | DoRALinear)), None
        )
        if adapter is not None:
            raise ValueError(
                f"{adapter}: {type(quantizer).__name__} fake-quantises plain linear layers, not "
                "a LoRA layer's merged weight; with a LoRA student use "
                "kdtune.quantization.qat.GGUFQ4_0QATQuantizer (or GGUFQ8_0QATQuantizer), or "
                "train a full student"
            )
        if dtype is not None:
            quantizer.precision = dtype  # as torchtune's qat_distributed recipe does
    check_block_widths(model, quantizer_groupsize(quantizer), quantizer)
    prepared = quantizer.prepare(model)
    return prepared if prepared is not None else model


def set_fake_quant(model: nn.Module, quantizer: Any, enabled: bool) -> None:
    """Turn fake quantisation on or off in a prepared model (kdtune's or torchao's modules)."""
    if isinstance(quantizer, GGUFQATQuantizer):
        output = getattr(model, "output", None)
        tied = [output.linear] if isinstance(output, TiedLinear) else []  # not a submodule
        for module in [*model.modules(), *tied]:
            if isinstance(module, _FakeQuant):
                module.fake_quant_enabled = enabled
        return
    # torchao's QAT linears: flip each fake quantiser they have. Not torchtune's
    # enable/disable_4w_fake_quant: torchao's Int4WeightOnlyQATLinear.enable_fake_quant sets
    # its activation quantiser, which is None (weight-only), and raises.
    toggled = 0
    for module in model.modules():
        for attribute in ("activation_fake_quantizer", "weight_fake_quantizer"):
            fake_quantizer = getattr(module, attribute, None)
            if fake_quantizer is not None:
                fake_quantizer.enabled = enabled
                toggled += 1
    if not toggled:
        raise ValueError(f"{type(quantizer).__name__} has no fake quantisation to turn on or off")


class FakeQuantSchedule:
    """Fake quantisation off for steps ``< after_n_steps``, on from then (always on for None),
    as torchtune's ``fake_quant_after_n_steps``. A function of the step alone, so a resumed run
    is in the state the original run was in at that step.

    Args:
        quantizer: the prepared model's quantiser.
        after_n_steps: optimizer steps to train before fake quantisation starts (None: from 0).
    """

    def __init__(self, quantizer: Any, after_n_steps: int | None) -> None:
        if after_n_steps is not None and after_n_steps < 0:
            raise ValueError(f"fake_quant_after_n_steps = {after_n_steps}: must be >= 0")
        self.quantizer, self.after_n_steps = quantizer, after_n_steps
        self._enabled: bool | None = None

    def enabled_at(self, step: int) -> bool:
        return self.after_n_steps is None or step >= self.after_n_steps

    def apply(self, model: nn.Module, step: int) -> bool:
        """Set the model's state for the step about to run (``step`` = steps done); returns it.
        Touches the modules only when the state changes."""
        enabled = self.enabled_at(step)
        if enabled != self._enabled:
            set_fake_quant(model, self.quantizer, enabled)
            self._enabled = enabled
        return enabled


def fake_quantized_head_input(model: nn.Module, hidden: Tensor) -> Tensor:
    """The final hidden states ``[..., D]`` as the prepared model's output layer sees them: a
    torchao QAT output layer fake-quantises its input per token (so this commutes with chunking
    along tokens); unchanged otherwise. For the fused loss, which runs the head itself."""
    activation_fake_quantizer = getattr(
        getattr(model, "output", None), "activation_fake_quantizer", None
    )
    return hidden if activation_fake_quantizer is None else activation_fake_quantizer(hidden)


def fake_quantized_output_weight(model: nn.Module, weight: Tensor) -> Tensor:
    """The output projection's weight as the prepared model's forward uses it: for the fused
    loss, which reads the head's weight itself (``kdtune.training.lm_head.output_projection``).
    ``weight`` is returned unchanged for a model without GGUF fake quantisation on its head."""
    output = getattr(model, "output", None)
    if isinstance(output, TiedLinear) and isinstance(output.linear, _FakeQuant):
        return output.linear.quantized(weight, weight.dtype)
    if isinstance(output, _FakeQuant):
        return output.quantized(weight, weight.dtype)
    weight_fake_quantizer = getattr(output, "weight_fake_quantizer", None)  # torchao's QAT linear
    if weight_fake_quantizer is not None:
        return weight_fake_quantizer(weight)  # the identity while disabled
    return weight


__all__ = [
    "SUPPORTED",
    "FakeQuantSchedule",
    "GGUFQ4_0QATQuantizer",
    "GGUFQ8_0QATQuantizer",
    "GGUFQATQuantizer",
    "build_quantizer",
    "check_block_widths",
    "fake_quantized_head_input",
    "fake_quantized_output_weight",
    "prepare_student",
    "set_fake_quant",
]
