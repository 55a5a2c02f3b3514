"""Final-norm hidden states and the output projection of a torchtune ``TransformerDecoder``.

The fused loss (:class:`kdtune.losses.fused.FusedLinearKDLoss`) projects hidden states to logits
one chunk at a time, so the model must stop before its output projection. torchtune 0.6.1 has
no switch for that: ``TransformerDecoder.forward`` always ends with ``self.unembed(h)``, which
applies the final norm and then the projection (and ``.float()``). :func:`forward_hidden` calls
the model as usual, through ``model(...)``, so every module hook runs (FSDP2's root
pre-/post-forward hooks, which also register the pre-backward hook on the returned hidden
states), with ``unembed`` shadowed for the duration of the call by an instance attribute that
applies only the final norm. :func:`output_projection` returns the projection's weight and
bias for the loss.

FSDP2 (``fully_shard``). Outside a forward, a sharded model's registered parameters are
``DTensor`` shards. :func:`output_projection` then unshards the FSDP group that owns the
projection weight (``FSDPModule.unshard()``, the module the group was created on) and returns
the unsharded parameter that FSDP's own forward would have used. The loss's weight gradient is
accumulated into that parameter's ``.grad``, and FSDP's post-backward (run for every group at
the end of backward) reduce-scatters it into the sharded gradient exactly as after a normal
forward, with the same mixed-precision and gradient-division settings; the post-backward also
reshards the group. This works whether the weight sits in the root group (torchtune's
``shard_model``), in a group of its own, or is tied to the token embedding. A teacher has no
backward to reshard its group, so call :func:`release_output_projection` after its loss.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

try:  # FSDP2 and DTensor ship with every torch build this project supports (>= 2.6).
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch built without distributed support
    FSDPModule = DTensor = None  # type: ignore[assignment,misc]

from torchtune.modules import TiedLinear

from kdtune.quantization.qat import fake_quantized_head_input, fake_quantized_output_weight


def _check_decoder(model: Any) -> None:
    for attribute in ("norm", "output", "unembed"):
        if not hasattr(model, attribute):
            raise ValueError(
                f"Expected a torchtune TransformerDecoder (with norm, output and unembed), got "
                f"{type(model).__name__} without {attribute!r}. Pass the decoder itself, not a "
                f"wrapper around it."
            )


def _final_norm_only(model: nn.Module, h: Tensor) -> Tensor:
    """Stands in for ``TransformerDecoder.unembed``: the final norm, no projection, no upcast
    (and a QAT output layer's input fake quantisation, which the projection would apply)."""
    return fake_quantized_head_input(model, model.norm(h))


def forward_hidden(model: nn.Module, tokens: Tensor, **forward_kwargs: Any) -> Tensor:
    """The model's final-norm hidden states, without the output projection.

    Args:
        model: a torchtune ``TransformerDecoder``, plain or sharded with ``fully_shard``.
        tokens: ``[B, S]`` token ids.
        **forward_kwargs: passed to ``model.forward`` (``mask``, ``input_pos``, ...).

    Returns:
        ``[B, S, D]`` hidden states in the model's dtype (``model(tokens)`` would have returned
        ``output(hidden).float()``). The model's chunked-output setting
        (``set_num_output_chunks``) does not matter here. If the model returns intermediate
        hidden states too (``output_hidden_states``), only the final one is returned.
    """
    _check_decoder(model)
    if "unembed" in vars(model):
        raise ValueError(
            "model.unembed is already overridden on the instance; forward_hidden cannot be "
            "nested or combined with another override of unembed."
        )
    # A plain function in the instance __dict__ shadows the class method (nn.Module only
    # registers Modules/Parameters/buffers specially), and is removed even if forward raises.
    model.unembed = lambda h: _final_norm_only(model, h)
    try:
        output = model(tokens, **forward_kwargs)
    finally:
        del model.unembed
    return output[-1] if isinstance(output, list) else output


def _chunked_output_2d(model: nn.Module, h: Tensor) -> list[Tensor]:
    """torchtune's ``chunked_output`` with each chunk projected as a 2-D ``[B * S_i, D]`` matrix."""
    chunks = h.chunk(model.num_output_chunks, dim=1)
    return [model.output(c.reshape(-1, c.shape[-1])).view(*c.shape[:-1], -1) for c in chunks]


def chunked_logits(model: nn.Module, tokens: Tensor, **forward_kwargs: Any) -> list[Tensor]:
    """``model(tokens)`` of a model in chunked-output mode, each chunk projected as a 2-D matrix.

    The same list of ``[B, S_i, V]`` chunks in the model's dtype as torchtune's
    ``chunked_output`` (``model.output`` applied to ``h.chunk(num_output_chunks, dim=1)``), but
    the output layer sees ``[B * S_i, D]``. A chunk is a non-contiguous slice of ``h``, and
    ``aten::matmul`` folds a 3-D input into one 2-D product only when the weight needs a
    gradient; for a frozen head (a teacher's, a LoRA student's frozen or tied output) it runs a
    batched matmul over a copy of the weight expanded per batch row instead (on CPU, bf16, about
    30x slower under ``no_grad``, 6x for a LoRA student's forward and backward). Used for the
    teacher and the student alike; the gradient w.r.t. ``h`` flows through the reshape. Like
    :func:`forward_hidden`, the model runs through ``model(...)`` (every hook, FSDP2's included)
    with ``chunked_output`` shadowed for the call, so the output layer runs inside the forward,
    whatever its type (quantised, tied, LoRA).
    """
    _check_decoder(model)
    if "chunked_output" in vars(model):
        raise ValueError("model.chunked_output is already overridden on the instance.")
    model.chunked_output = lambda h: _chunked_output_2d(model, h)
    try:
        return model(tokens, **forward_kwargs)
    finally:
        del model.chunked_output


def _last_position_only(model: nn.Module, h: Tensor) -> Tensor:
    """Stands in for ``TransformerDecoder.unembed``: final norm and projection of the last
    position only, as ``[B, 1, D]`` -> ``[B, 1, V]`` (a 2-D product when ``B`` is 1)."""
    last = model.norm(h[:, -1:])
    return model.output(last.reshape(-1, last.shape[-1])).view(*last.shape[:-1], -1)


def last_position_logits(model: nn.Module, tokens: Tensor, **forward_kwargs: Any) -> Tensor:
    """Logits of the last position only, ``[B, V]`` in the model's dtype (for decoding).

    The output layer runs on ``[B, D]`` inside the forward (``unembed`` shadowed, as in
    :func:`forward_hidden`), whatever the model's chunked-output setting: a prefill of ``P``
    prompt tokens projects one row per sequence instead of ``P``, and no chunk list is formed.
    """
    _check_decoder(model)
    if "unembed" in vars(model):
        raise ValueError("model.unembed is already overridden on the instance.")
    model.unembed = lambda h: _last_position_only(model, h)
    try:
        output = model(tokens, **forward_kwargs)
    finally:
        del model.unembed
    output = output[-1] if isinstance(output, list) else output
    return output[:, -1]


def _projection_module(model: nn.Module) -> tuple[nn.Module, Tensor | None]:
    """The module whose ``weight`` is the projection, and the projection's bias."""
    output = model.output
    if isinstance(output, TiedLinear):
        return output.tied_module, None
    if isinstance(output, nn.Linear):
        return output, output.bias
    raise ValueError(
        f"output_projection supports an nn.Linear or TiedLinear output layer, got "
        f"{type(output).__name__}. A LoRA/DoRA or quantised output layer cannot be projected "
        f"chunk by chunk from one weight: build the student with apply_lora_to_output=False, "
        f"or use the chunked loss (kdtune.losses.chunked) with the model's logits."
    )


def _owning_fsdp_module(model: nn.Module, module: nn.Module) -> nn.Module | None:
    """The FSDP module whose parameter group holds ``module``'s parameters, if any.

    ``fully_shard`` puts a parameter into the group of the nearest module, counting the
    parameter's own module and going up, on which ``fully_shard`` was called.
    """
    if FSDPModule is None:
        return None
    path = next((name for name, candidate in model.named_modules() if candidate is module), None)
    if path is None:
        raise ValueError(f"{type(module).__name__} is not a submodule of the model.")
    parts = path.split(".") if path else []
    for depth in range(len(parts), -1, -1):
        candidate = model.get_submodule(".".join(parts[:depth]))
        if isinstance(candidate, FSDPModule):
            return candidate
    return None


def output_projection(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The output projection's ``(weight [V, D], bias [V] or None)`` for the fused loss.

    For a model sharded with FSDP2 the weight is the unsharded parameter (its group is
    unsharded here if it is not already); its gradient reaches FSDP's reduce-scatter as after
    a normal forward (see the module docstring). With tied embeddings (``TiedLinear``) the weight
    is the token embedding's, and the gradient reaches ``tok_embeddings.weight``.
    """
    _check_decoder(model)
    module, bias = _projection_module(model)
    if DTensor is not None and isinstance(module.weight, DTensor):
        owner = _owning_fsdp_module(model, module)
        if owner is None:
            raise ValueError(
                "The output projection's weight is a DTensor but no FSDP module owns it; "
                "only FSDP2 (fully_shard) sharding is supported."
            )
        # Registers the unsharded parameters on their modules, as FSDP's pre-forward does.
        owner.unshard()
        bias = model.output.bias if isinstance(model.output, nn.Linear) else None
    # a QAT student (kdtune.quantization.qat) computes with its head's fake-quantised weight
    return fake_quantized_output_weight(model, module.weight), bias


def release_output_projection(model: nn.Module) -> None:
    """Reshard what :func:`output_projection` unsharded, for a model without a backward.

    Call it on an FSDP-sharded teacher once its loss has been computed; a student's group is
    resharded by FSDP's post-backward. No-op for an unsharded model.
    """
    _check_decoder(model)
    module, _ = _projection_module(model)
    owner = _owning_fsdp_module(model, module)
    if owner is not None:
        owner.reshard()
