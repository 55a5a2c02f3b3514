"""Per-layer parallelism of a model, as small ordered functions (torchtitan style)::

    apply_activation_checkpointing(student)              # optional, per layer
    apply_compile(student, backend="inductor")           # optional, per layer
    shard_model(student, trainable=True, ...)            # fully_shard each layer, then the root
    shard_model(teacher, trainable=False, ...)           # frozen: never holds gradients
    ...
    set_gradient_sync(student, last_micro_batch)         # reduce-scatter once per step
    clip_grad_norm_(student, max_norm)                   # global norm over every rank's shards

Gradient reduction. The project's loss contract divides each rank's token-sum by the *global*
count of non-ignored tokens (all ranks, all micro-batches). The exact gradient of the global
mean is then the SUM of the ranks' gradients, whereas FSDP2 averages them by default (it
divides by the world size). :func:`shard_model` therefore sets every FSDP module's gradient
divide factor to 1 and forces a SUM reduction (gloo has no PREMUL_SUM), so do *not* multiply
the loss by the world size: 2 ranks x half a batch give the gradients of 1 process x the full
batch. That, and a ``MixedPrecisionPolicy`` (bf16 compute, fp32 gradient reduction), are why
this is not ``torchtune.training.shard_model``, which takes neither.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    CheckpointWrapper,
    checkpoint_wrapper,
)
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.tensor import DTensor

from kdtune.training.process_group import is_distributed


def transformer_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's transformer layers: modules named ``layers.<i>`` (at any depth).

    Names and modules in ``named_modules`` order; only the outermost match counts (a block
    nested inside a layer is part of that layer). A layer already wrapped for activation
    checkpointing is returned as its wrapper (the ``layers.<i>`` entry), so checkpointing,
    compile and sharding agree on what "a layer" is.
    """
    layers: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        parts = name.split(".")
        is_layer = len(parts) >= 2 and parts[-2] == "layers" and parts[-1].isdigit()
        inside_previous = bool(layers) and name.startswith(layers[-1][0] + ".")
        if is_layer and not inside_previous:
            layers.append((name, module))
    return layers


def _require_layers(model: nn.Module, what: str) -> list[tuple[str, nn.Module]]:
    layers = transformer_layers(model)
    if not layers:
        raise ValueError(
            f"{what}: {type(model).__name__} has no modules named 'layers.<i>'; pass a "
            "torchtune TransformerDecoder (or a model that keeps its blocks in a 'layers' list)"
        )
    return layers


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Wrap every transformer layer in non-reentrant activation checkpointing, in place.

    Apply before :func:`apply_compile` and :func:`shard_model`. Works on a meta-device model
    and in a single process. State-dict keys are unchanged (the wrapper strips its prefix).

    Returns:
        ``model`` (for chaining).
    """
    for name, layer in _require_layers(model, "apply_activation_checkpointing"):
        if isinstance(layer, CheckpointWrapper):
            continue  # already wrapped
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        wrapped = checkpoint_wrapper(layer, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
        parent.register_module(child_name, wrapped)
    return model


def apply_compile(model: nn.Module, *, backend: str) -> nn.Module:
    """``torch.compile`` every transformer layer in place (``Module.compile``).

    Per layer, as torchtune's ``compile_model`` and torchtitan do: identical layers reuse one
    small graph, and FSDP2 can still shard layer by layer. In place, so parameter and
    state-dict names do not gain an ``_orig_mod`` prefix. Apply after
    :func:`apply_activation_checkpointing` and before :func:`shard_model`; works in a single
    process too.

    Args:
        backend: a ``torch.compile`` backend: ``"inductor"`` for speed, ``"eager"`` to check
            tracing only.

    Returns:
        ``model`` (for chaining).
    """
    for _, layer in _require_layers(model, "apply_compile"):
        layer.compile(backend=backend)
    return model


def shard_model(
    model: nn.Module,
    *,
    trainable: bool,
    reshard_after_forward: bool,
    cpu_offload: bool,
    param_dtype: torch.dtype | None,
    reduce_dtype: torch.dtype | None,
) -> nn.Module:
    """FSDP2 ``fully_shard`` each transformer layer, then the root (embeddings, norm, output).

    Under a process group of several ranks, every parameter becomes a dim-0 sharded
    ``DTensor``; each layer is one all-gather / reduce-scatter group and the root holds the
    rest. A meta-device model stays on meta: load it with :func:`load_full_state_dict`.

    Gradients are SUMMED across ranks (divide factor 1, sum reduction): the loss must already
    be divided by the global token count (see the module docstring). Never also multiply the
    loss by the world size.

    In a single process this only freezes a non-trainable model; sharding, offload and mixed
    precision do not apply (the model keeps its own dtype).

    Args:
        model: a torchtune ``TransformerDecoder`` (or anything with ``layers.<i>`` blocks).
        trainable: False for the teacher: every parameter is frozen (``requires_grad=False``),
            so no gradient is ever computed, gathered or reduced. True leaves ``requires_grad``
            as it is (a LoRA student has frozen its base weights already).
        reshard_after_forward: True frees the gathered weights after each layer's forward
            (least memory; gathered again in backward). False keeps them until backward (one
            all-gather less per layer); for a frozen model, whose backward never runs, they
            then stay gathered after the first forward, so use False only when memory allows
            a full copy.
        cpu_offload: keep the sharded parameters, gradients and optimizer state on CPU (FSDP2
            ``CPUOffloadPolicy``; the optimizer step runs on CPU). Pinned memory only when an
            accelerator exists.
        param_dtype: dtype of the gathered weights used for compute (``torch.bfloat16`` for
            bf16 mixed precision over fp32 sharded weights), or None for the weights' dtype.
        reduce_dtype: dtype of the gradient reduce-scatter (``torch.float32`` to sum bf16
            gradients in fp32), or None for ``param_dtype``.

    Returns:
        ``model``, sharded in place.

    Raises:
        ValueError: the model has no ``layers.<i>`` modules.
    """
    layers = _require_layers(model, "shard_model")  # checked in one process too
    if not trainable:
        model.requires_grad_(False)
    if not is_distributed():
        return model
    offload: OffloadPolicy = (
        CPUOffloadPolicy(pin_memory=torch.accelerator.is_available())
        if cpu_offload
        else OffloadPolicy()
    )
    fsdp_kwargs: dict[str, Any] = {
        "reshard_after_forward": reshard_after_forward,
        "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
        "offload_policy": offload,
    }
    # Bottom-up: a layer's parameters must be claimed by its own group before the root's.
    for _, layer in reversed(layers):
        fully_shard(layer, **fsdp_kwargs)
    fully_shard(model, **fsdp_kwargs)
    if trainable:
        _sum_gradients_across_ranks(model)
    return model


def _sum_gradients_across_ranks(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            # With factor 1 FSDP2 would use PREMUL_SUM(1.0), which gloo lacks; a plain SUM
            # (and no division, since the factor is 1) is the same on NCCL and works on gloo.
            module.set_force_sum_reduction_for_comms(True)


def clip_grad_norm_(model: nn.Module, max_norm: float) -> Tensor:
    """Clip the gradients' global 2-norm to ``max_norm`` in place; return the norm before.

    Under FSDP2 the norm covers every rank's shards (the same value on every rank). Returns a
    plain 0-dim fp32 tensor in both cases.
    """
    parameters = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm=max_norm)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return norm.detach().float()


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """FSDP2: reduce-scatter gradients in the next backward (``enabled``) or keep accumulating
    them unsharded on each rank (no communication). No-op for a model that is not sharded.

    Call with False for every micro-batch of an optimizer step but the last: the last
    backward then reduces the sum of the step's gradients once.
    """
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)


def local_parameter_bytes(model: nn.Module) -> int:
    """Bytes of the parameters this rank holds: its shards under FSDP2, all in one process.

    Call between steps: while a layer is gathered (inside forward/backward, or after a forward
    with ``reshard_after_forward=False``) its full weights are registered instead.
    """
    total = 0
    for param in model.parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        total += local.numel() * local.element_size()
    return total


def compile_backend() -> str:
    """``TORCH_COMPILE_BACKEND`` (torchtune's convention), default ``inductor``."""
    return os.environ.get("TORCH_COMPILE_BACKEND", "inductor")
