"""Full (unsharded) state dicts of a possibly sharded, possibly meta-device model and its
optimizer: load rank 0's checkpoint into every rank's shards, gather everything to rank 0.

Kept instead of torchtune 0.6.1's ``load_from_full_model_state_dict`` /
``gather_cpu_state_dict`` / ``get_full_optimizer_state_dict``: those need every rank to hold
the full checkpoint (no broadcast from rank 0), fail without a process group (a barrier per
tensor), and return tensors that alias the live optimizer state; these work in one process too.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor
from torch.nn.modules.module import _IncompatibleKeys
from torch.optim import Optimizer

from kdtune.training.process_group import broadcast_object, is_distributed, is_main_process

# Prefixes that wrappers insert into parameter names but that state dicts do not carry.
_WRAPPER_PREFIXES = re.compile(r"(_checkpoint_wrapped_module|_orig_mod|_fsdp_wrapped_module)\.")


def _meta_tensor_count(model: nn.Module) -> tuple[int, int]:
    """``(meta, total)`` over the model's parameters and buffers."""
    flags = [t.is_meta for t in _tensors(model)]
    return sum(flags), len(flags)


def _tensors(model: nn.Module) -> Iterator[Tensor]:
    yield from model.parameters()
    yield from model.buffers()


def materialize_meta_model(model: nn.Module, device: str | torch.device) -> nn.Module:
    """Allocate a meta-device model on ``device`` and recompute what no checkpoint holds.

    ``to_empty`` (values undefined), then RoPE caches (``rope_init``: non-persistent buffers)
    and LoRA/DoRA adapters (``initialize_parameters``: Kaiming A, zero B, as torchtune) are
    initialised. Everything else must come from :func:`load_full_state_dict`. A no-op when
    nothing is on meta. Works before or after :func:`shard_model`.

    Args:
        device: where the (local shards of the) parameters live: the compute device, or
            ``"cpu"`` when sharded with ``cpu_offload=True``.

    Raises:
        ValueError: only part of the model is on meta (``to_empty`` would erase the rest).
    """
    meta, total = _meta_tensor_count(model)
    if meta == 0:
        return model
    if meta != total:
        raise ValueError(
            f"materialize_meta_model: {meta} of {total} parameters/buffers are on the meta "
            "device; build the whole model under torch.device('meta') (or none of it)"
        )
    model.to_empty(device=device)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "rope_init"):
                module.rope_init()
            if hasattr(module, "initialize_parameters"):
                module.initialize_parameters()
    return model


def _state_dict_keys_and_dtypes(model: nn.Module) -> dict[str, torch.dtype]:
    return {key: value.dtype for key, value in model.state_dict().items()}


def load_full_state_dict(
    model: nn.Module,
    full_state_dict: dict[str, Tensor] | None,
    *,
    device: str | torch.device,
    strict: bool,
    broadcast_from_rank0: bool,
) -> _IncompatibleKeys:
    """Load an unsharded state dict into a (possibly sharded, possibly meta) model.

    A meta model is first materialised (:func:`materialize_meta_model`). Under FSDP2 each rank
    keeps only its shard (``torch.distributed.checkpoint``'s ``set_model_state_dict`` with
    ``full_state_dict=True``). Values are cast to the model's dtypes; keys the model lacks are
    ignored (reported as unexpected). ``requires_grad`` is preserved (a frozen teacher stays
    frozen). The caller's dict is not modified.

    Args:
        full_state_dict: torchtune-keyed full tensors (any device). With
            ``broadcast_from_rank0`` only rank 0 needs it (others may pass None or ``{}``).
        device: where the parameters live (``"cpu"`` when sharded with ``cpu_offload``).
        strict: raise when a key is missing or unexpected. Use False for a LoRA student's base
            checkpoint (its adapters are missing) and check the returned keys.
        broadcast_from_rank0: True: rank 0 reads the checkpoint and broadcasts it (one CPU
            copy on the node); False: every rank passes its own full copy.

    Returns:
        ``missing_keys`` / ``unexpected_keys``, identical on every rank.

    Raises:
        ValueError: ``strict`` and keys differ; or no state dict where one is needed.
    """
    materialize_meta_model(model, device)
    model_dtypes = _state_dict_keys_and_dtypes(model)
    holds_data = not (is_distributed() and broadcast_from_rank0) or is_main_process()
    if holds_data and full_state_dict is None:
        raise ValueError(
            "load_full_state_dict: full_state_dict is None on a rank that must provide it: "
            "pass the checkpoint on every rank, or on rank 0 with broadcast_from_rank0=True"
        )
    given_keys = sorted(full_state_dict) if holds_data else None
    if is_distributed() and broadcast_from_rank0:
        given_keys = broadcast_object(given_keys)
    missing = sorted(set(model_dtypes) - set(given_keys))
    unexpected = sorted(set(given_keys) - set(model_dtypes))
    if strict and (missing or unexpected):
        raise ValueError(
            f"load_full_state_dict: the state dict does not match the model: missing "
            f"{missing}, unexpected {unexpected}; check the model builder against the "
            "checkpoint (or pass strict=False and check the returned keys)"
        )
    # A new dict: DSD replaces the values of the dict it is given with the local shards.
    to_load = (
        {
            key: value.to(model_dtypes[key])
            for key, value in full_state_dict.items()
            if key in model_dtypes
        }
        if holds_data
        else {}
    )
    if is_distributed():
        options = StateDictOptions(
            full_state_dict=True, broadcast_from_rank0=broadcast_from_rank0, strict=False
        )
        set_model_state_dict(model, to_load, options=options)
    else:
        model.load_state_dict(to_load, strict=False)
    return _IncompatibleKeys(missing, unexpected)


def state_dict_key(parameter_name: str) -> str:
    """The checkpoint key of a ``named_parameters()`` name: wrapper prefixes removed
    (``layers.0._checkpoint_wrapped_module.attn.q_proj.weight`` -> ``layers.0.attn.q_proj.weight``).
    """
    return _WRAPPER_PREFIXES.sub("", parameter_name)


def gather_full_state_dict(model: nn.Module, *, trainable_only: bool) -> dict[str, Tensor] | None:
    """The full (unsharded) state dict on CPU on rank 0; None on the other ranks.

    A collective under FSDP2: call on every rank. Tensors are gathered one at a time, so no
    rank ever holds more than one extra full tensor on its device. The result never shares
    memory with the live model (later optimizer steps do not change it). Keys are the
    checkpoint keys (no activation-checkpoint or compile prefixes).

    Args:
        trainable_only: only parameters with ``requires_grad`` (a LoRA student's adapters:
            the adapter checkpoint); False gives everything (weights and persistent buffers).
    """
    trainable = {state_dict_key(n) for n, p in model.named_parameters() if p.requires_grad}
    keep = is_main_process()
    gathered: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        if trainable_only and key not in trainable:
            continue
        value = value.detach()
        if isinstance(value, DTensor):
            if value.device.type == "cpu" and value.device_mesh.device_type != "cpu":
                # CPU-offloaded shard of a GPU run: gather over NCCL, not gloo.
                value = value.to(value.device_mesh.device_type)
            full = value.full_tensor()  # fresh memory on every rank
            if keep:
                gathered[key] = full.cpu()
        elif keep:
            gathered[key] = value.to("cpu", copy=True)
    return gathered if keep else None


def _live_storage_pointers(optimizer: Optimizer) -> set[int]:
    """Storages of the optimizer's plain-tensor state (sharded DTensor state is never aliased
    by a gathered copy)."""
    pointers = set()
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, Tensor) and not isinstance(value, DTensor):
                pointers.add(value.untyped_storage().data_ptr())
    return pointers


def _copy_tree(obj: Any, clone_if: Callable[[Tensor], bool]) -> Any:
    """Dicts and lists copied; tensors cloned where ``clone_if`` says, else shared."""
    if isinstance(obj, dict):
        return {key: _copy_tree(value, clone_if) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_copy_tree(value, clone_if) for value in obj]
    if isinstance(obj, Tensor) and clone_if(obj):
        return obj.clone()
    return obj


def gather_full_optimizer_state_dict(
    model: nn.Module, optimizer: Optimizer
) -> dict[str, Any] | None:
    """The optimizer's full state on CPU on rank 0 (None on other ranks).

    ``torch.distributed.checkpoint``'s ``get_optimizer_state_dict`` with ``full_state_dict``:
    parameters are named by their checkpoint keys (not by index), so a state saved with N
    ranks loads into any number of ranks, one process included. A collective under FSDP2.
    The result never shares memory with the live optimizer.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_optimizer_state_dict(model, optimizer, options=options)
    if not is_main_process():
        return None
    live = _live_storage_pointers(optimizer)
    return _copy_tree(state, lambda t: t.untyped_storage().data_ptr() in live)


def load_full_optimizer_state_dict(
    model: nn.Module,
    optimizer: Optimizer,
    full_state_dict: dict[str, Any] | None,
    *,
    broadcast_from_rank0: bool,
) -> None:
    """Load a state from :func:`gather_full_optimizer_state_dict` into a (sharded) optimizer.

    Each rank keeps its shard of every state tensor; hyper-parameters (``lr`` ...) of the
    parameter groups are restored too. The caller's dict is not modified. A collective under
    FSDP2.

    Args:
        full_state_dict: the gathered state. With ``broadcast_from_rank0`` only rank 0 needs
            it (others may pass None).
        broadcast_from_rank0: True: rank 0 broadcasts; False: every rank passes a full copy.

    Raises:
        ValueError: no state dict on a rank that must provide it.
    """
    holds_data = not (is_distributed() and broadcast_from_rank0) or is_main_process()
    if holds_data and full_state_dict is None:
        raise ValueError(
            "load_full_optimizer_state_dict: full_state_dict is None on a rank that must "
            "provide it: pass it on every rank, or on rank 0 with broadcast_from_rank0=True"
        )
    # DSD rewrites the containers it is given, and the optimizer may keep 0-dim tensors (Adam's
    # `step`) as they are and update them in place: copy both, share the large tensors.
    to_load = _copy_tree(full_state_dict, lambda t: t.dim() == 0) if holds_data else {}
    # DSD (torch 2.13) fails with a KeyError on a param-group key the saved state has and the
    # live optimizer lacks (a scheduler's `initial_lr`): add such keys first; DSD then loads
    # the saved values.
    saved_groups = to_load.get("param_groups") if holds_data else None
    if is_distributed() and broadcast_from_rank0:
        saved_groups = broadcast_object(saved_groups)
    for group, saved in zip(optimizer.param_groups, saved_groups or []):
        for key, value in saved.items():
            if key != "params":
                group.setdefault(key, value)
    options = StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=is_distributed() and broadcast_from_rank0
    )
    set_optimizer_state_dict(model, optimizer, to_load, options=options)
