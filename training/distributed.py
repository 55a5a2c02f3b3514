"""Data-parallel (FSDP2) primitives of the KD recipe, as small ordered functions.

One recipe serves one process and many: every function here works in a plain single process
(no process group) as a no-op or its trivial equivalent, so the recipe calls the same functions
either way. Under ``torchrun`` with more than one process the order is (torchtitan style)::

    info = init_distributed(device)                      # process group, this rank's device
    with torch.device("meta"):                           # no memory for weights yet
        student, teacher = build_student(), build_teacher()
    apply_activation_checkpointing(student)              # optional, per layer
    apply_compile(student, backend="inductor")           # optional, per layer
    shard_model(student, trainable=True, ...)            # fully_shard each layer, then the root
    shard_model(teacher, trainable=False, ...)           # frozen: never holds gradients
    load_full_state_dict(student, sd, ...)               # rank 0's (or every rank's) full copy
    ...
    local = loss_sum_of_my_tokens / all_reduce_sum(my_token_count)   # global-token normalisation
    local.backward()                                     # gradients are SUMMED across ranks
    ...
    gather_full_state_dict(student, trainable_only=False)     # rank 0: CPU dict; others: None
    gather_full_optimizer_state_dict(student, optimizer)      # rank 0: CPU dict; others: None
    teardown()                                           # barrier, then destroy_process_group

Gradient reduction. The project's loss contract divides each rank's token-sum by the *global*
count of non-ignored tokens (all ranks, all micro-batches). The exact gradient of the global
mean is then the SUM of the ranks' gradients, whereas FSDP2 averages them by default (it
divides by the world size). :func:`shard_model` therefore sets every FSDP module's gradient
divide factor to 1 and forces a SUM reduction (gloo has no PREMUL_SUM), so do *not* multiply
the loss by the world size: 2 ranks x half a batch give the gradients of 1 process x the full
batch.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    CheckpointWrapper,
    checkpoint_wrapper,
)
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.tensor import DTensor
from torch.nn.modules.module import _IncompatibleKeys
from torch.optim import Optimizer
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

__all__ = [
    "DistInfo",
    "all_reduce_sum",
    "apply_activation_checkpointing",
    "apply_compile",
    "barrier",
    "broadcast_object",
    "build_dataloader",
    "clip_grad_norm_",
    "gather_from_ranks",
    "gather_full_optimizer_state_dict",
    "gather_full_state_dict",
    "gather_objects",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "load_full_optimizer_state_dict",
    "load_full_state_dict",
    "local_parameter_bytes",
    "materialize_meta_model",
    "peak_memory_gib",
    "set_gradient_sync",
    "shard_model",
    "state_dict_key",
    "teardown",
    "transformer_layers",
    "world_size_and_rank",
]

# Prefixes that wrappers insert into parameter names but that state dicts do not carry.
_WRAPPER_PREFIXES = re.compile(r"(_checkpoint_wrapped_module|_orig_mod|_fsdp_wrapped_module)\.")


# --------------------------------------------------------------------------------------------
# Process group
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the run.

    ``device`` is the device this process computes on: ``cuda:LOCAL_RANK`` for a CUDA run with
    several processes, else the device asked for.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, shows progress and writes files."""
        return self.rank == 0


def is_distributed() -> bool:
    """True when a process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size_and_rank() -> tuple[int, int]:
    """``(world_size, rank)``; ``(1, 0)`` without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def is_main_process() -> bool:
    """True on rank 0, and in a single process."""
    return world_size_and_rank()[1] == 0


def init_distributed(device: str | torch.device) -> DistInfo:
    """Initialise the process group when ``torchrun`` started more than one process.

    Reads torchrun's ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``. With one process (or none of
    them set) nothing is initialised and the run is a plain single process. The backend is
    ``cuda:nccl,cpu:gloo`` for CUDA (gloo carries CPU tensors: CPU offload, CPU all-reduces)
    and ``gloo`` for CPU. Calling it again after initialisation returns the same answer.

    Args:
        device: ``"cpu"``, ``"cuda"`` or a ``torch.device``. With several CUDA processes each
            takes ``cuda:LOCAL_RANK``; an explicit index is refused there.

    Raises:
        ValueError: ``device`` names one CUDA index while several processes were launched.
    """
    device = torch.device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size <= 1:
        return DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    if device.type == "cuda":
        if device.index is not None:
            raise ValueError(
                f"device={str(device)!r} names one GPU but torchrun started {world_size} "
                "processes: set device: cuda and each process takes cuda:LOCAL_RANK"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "cuda:nccl,cpu:gloo"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def teardown(*, wait_for_all: bool = True) -> None:
    """Barrier, then destroy the process group (no-op without one).

    The barrier matters: gloo sometimes aborts at teardown when one rank destroys the group
    while another is still in a collective. ``wait_for_all=False`` (after a failure) skips it:
    the other ranks may never reach it, and the failing rank must exit.
    """
    if dist.is_available() and dist.is_initialized():
        if wait_for_all:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """The element-wise sum of ``tensor`` over all ranks, as a new detached tensor.

    Used for the global count of non-ignored tokens (the loss denominator) and for logging
    sums. Any shape; ``tensor`` itself is left unchanged. In a single process: a detached copy.
    """
    summed = tensor.detach().clone()
    if is_distributed():
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
    return summed


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj`` in rank order, on every rank (``[obj]`` in one process).

    For small per-rank state saved by rank 0 (random-generator states). A collective.
    """
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any) -> Any:
    """Rank 0's picklable ``obj`` on every rank (``obj`` itself in one process).

    Lets rank 0 alone read a file (a checkpoint's training state) and share what it read, so
    the other ranks need neither the file nor the memory for its large parts. A collective;
    the other ranks' ``obj`` is ignored (pass None).
    """
    if not is_distributed():
        return obj
    return _broadcast_object(obj)


def gather_from_ranks(value: float) -> list[float]:
    """Every rank's ``value`` in rank order (``[value]`` in a single process).

    For logging per-rank numbers (peak memory) from rank 0. A collective: call on every rank.
    """
    if not is_distributed():
        return [float(value)]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, float(value))
    return [float(item) for item in gathered]


# --------------------------------------------------------------------------------------------
# Per-layer wrapping: activation checkpointing, compile, sharding
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Model state: meta materialisation, full load, gather on rank 0
# --------------------------------------------------------------------------------------------


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


def _broadcast_object(obj: Any) -> Any:
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


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
        given_keys = _broadcast_object(given_keys)
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


# --------------------------------------------------------------------------------------------
# Optimizer state
# --------------------------------------------------------------------------------------------


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
        saved_groups = _broadcast_object(saved_groups)
    for group, saved in zip(optimizer.param_groups, saved_groups or []):
        for key, value in saved.items():
            if key != "params":
                group.setdefault(key, value)
    options = StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=is_distributed() and broadcast_from_rank0
    )
    set_optimizer_state_dict(model, optimizer, to_load, options=options)


# --------------------------------------------------------------------------------------------
# Training-step helpers
# --------------------------------------------------------------------------------------------


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


def peak_memory_gib(device: str | torch.device) -> float:
    """This process's peak memory in GiB.

    CUDA: ``torch.cuda.max_memory_allocated`` (tensors only; reset it with
    ``torch.cuda.reset_peak_memory_stats``). CPU: the process's peak resident set (``VmHWM``
    from ``/proc/self/status``; ``ru_maxrss`` where there is no ``/proc``), which includes the
    interpreter and libraries.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 2**30  # the value is in kB
    except OSError:
        pass
    import resource
    import sys

    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max_rss / 2**30 if sys.platform == "darwin" else max_rss * 1024 / 2**30


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def build_dataloader(
    dataset: Dataset,
    *,
    batch_size: int,
    collate_fn: Any,
    shuffle: bool,
    seed: int,
    rank: int,
    world_size: int,
    drop_last: bool,
) -> StatefulDataLoader:
    """A resumable loader over this rank's share of the dataset.

    ``StatefulDataLoader`` over a ``StatefulDistributedSampler`` (torch's
    ``DistributedSampler`` plus a position): the epoch's order is a permutation seeded by
    ``seed + epoch``, rank ``r`` reads every ``world_size``-th index starting at ``r``, so the
    ranks' shards are disjoint and a step's global batch (all ranks, ``batch_size`` each) is
    the same set of samples as one process reading ``world_size * batch_size``.
    ``loader.state_dict()`` records the position inside the epoch.

    Call ``loader.sampler.set_epoch(epoch)`` before iterating each epoch, and on resume before
    ``loader.load_state_dict(state)``, with the epoch the state was saved in.

    Args:
        batch_size: samples per batch on this rank.
        collate_fn: list of samples -> batch.
        shuffle: reshuffle each epoch (seeded); False keeps the dataset order.
        seed: the permutation seed, the same on every rank.
        rank, world_size: this rank and the number of ranks (0 and 1 for one process).
        drop_last: drop the last incomplete batch of this rank. The sampler itself always pads
            the dataset (by repeating its first samples) to a multiple of ``world_size``, so
            every rank yields the same number of batches.

    Raises:
        ValueError: a rank outside ``[0, world_size)`` or a non-positive size.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"build_dataloader: rank={rank}, world_size={world_size}: need world_size >= 1 "
            "and 0 <= rank < world_size"
        )
    if batch_size < 1:
        raise ValueError(f"build_dataloader: batch_size={batch_size}: need a positive size")
    sampler = StatefulDistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed
    )
    return StatefulDataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        drop_last=drop_last,
        # Its own generator: a DataLoader draws a base seed from its generator whenever an
        # iterator starts; drawing from the global one would shift the training's random
        # stream (dropout) whenever a resumed run starts its iterator mid-epoch.
        generator=torch.Generator().manual_seed(seed),
    )
