"""Device, precision, sharding and model-loading decisions of the KD recipe, as small functions.

The recipe calls these in order (torchtitan style), the same in one process and under
``torchrun`` with several::

    runtime = setup_runtime(cfg)                        # process group, device, dtype, FSDP
    model = build_model(cfg.model, runtime.dtype)       # on meta: no memory yet
    is_lora = freeze_all_but_adapters(model)            # before sharding
    state = student_state_dict(model, base, adapters, seed=...)  # rank 0 only (others: None)
    prepare_student(model, runtime, ...)                # AC, compile, fully_shard
    load_weights(model, state, runtime)                 # rank 0's full dict -> each rank's shards

Everything that differs between one process and many (the process group, FSDP2 sharding, CPU
offload, mixed precision, who reads checkpoints) is decided here; the collectives themselves
are :mod:`kdtune.training.process_group`, :mod:`~kdtune.training.parallel` and
:mod:`~kdtune.training.state_dicts`, whose functions are no-ops (or the trivial equivalent)
in a single process.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torchtune import config, training, utils

from kdtune.training import parallel, process_group
from kdtune.training.adapters import freeze_all_but_adapters, student_state_dict
from kdtune.training.checkpoint import state_dicts
from kdtune.training.config.errors import ConfigError
from kdtune.training.config.schema import DISTRIBUTED_KEYS


@dataclass(frozen=True)
class ShardingOptions:
    """FSDP2 settings of a multi-process run (see :func:`kdtune.training.parallel.shard_model`)."""

    cpu_offload: bool
    student_reshard_after_forward: bool
    teacher_reshard_after_forward: bool
    param_dtype: torch.dtype | None
    reduce_dtype: torch.dtype | None


SINGLE_PROCESS = ShardingOptions(
    cpu_offload=False,
    student_reshard_after_forward=False,
    teacher_reshard_after_forward=False,
    param_dtype=None,
    reduce_dtype=None,
)
"""One process: nothing is sharded, offloaded or cast (``shard_model`` only freezes the teacher)."""


@dataclass(frozen=True)
class Runtime:
    """Where and how this process computes."""

    device: torch.device
    dtype: torch.dtype
    rank: int
    world_size: int
    sharding: ShardingOptions

    @property
    def is_main(self) -> bool:
        """The process that reads checkpoints, writes files, logs and shows progress."""
        return self.rank == 0

    @property
    def parameter_device(self) -> torch.device:
        """Where the (local shards of the) parameters live: CPU when offloaded."""
        return torch.device("cpu") if self.sharding.cpu_offload else self.device


def setup_runtime(cfg: DictConfig) -> Runtime:
    """Start the process group when ``torchrun`` launched several processes; resolve device,
    dtype and the FSDP2 options.

    With ``dtype: bf16`` a multi-process run computes in bf16 (as one process does) and sums
    gradients across ranks in fp32 (FSDP2 ``MixedPrecisionPolicy(param_dtype=bf16,
    reduce_dtype=fp32)``).

    Raises:
        ConfigError: ``device: cuda`` without a GPU; a multi-process run whose config lacks an
            FSDP key or asks for ``teacher_quantization`` (int8 weights cannot be sharded).
    """
    if str(cfg.device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device = 'cuda' but no CUDA device is available: set device: cpu")
    rank, world_size, device = process_group.init_distributed(
        str(cfg.device), cfg.get("collective_timeout_minutes")
    )
    if world_size == 1:
        device = utils.get_device(device=str(cfg.device))
    dtype = training.get_dtype(str(cfg.dtype), device=device)
    if rank != 0:
        _quiet_this_process()
    if world_size > 1:
        sharding = sharding_options(cfg, dtype, world_size)
    else:
        _warn_unused_fsdp_options(cfg)
        sharding = SINGLE_PROCESS
    return Runtime(
        device=device,
        dtype=dtype,
        rank=rank,
        world_size=world_size,
        sharding=sharding,
    )


def sharding_options(cfg: DictConfig, dtype: torch.dtype, world_size: int) -> ShardingOptions:
    """The FSDP2 options of a run with ``world_size`` > 1 processes, from the config.

    Raises:
        ConfigError: an FSDP key is missing, or ``teacher_quantization`` is set.
    """
    missing = [key for key in DISTRIBUTED_KEYS if key not in cfg]
    if missing:
        raise ConfigError(
            f"this run has {world_size} processes but the config lacks {missing}: add them "
            "(e.g. fsdp_cpu_offload: false, fsdp_reshard_after_forward: true, "
            "fsdp_teacher_reshard_after_forward: true), as in the shipped configs"
        )
    if cfg.teacher_quantization is not None:
        raise ConfigError(
            f"teacher_quantization = {cfg.teacher_quantization!r} with {world_size} processes: "
            "int8 teacher weights cannot be sharded by FSDP2; set teacher_quantization: null "
            f"(sharding already divides the teacher's memory by {world_size})"
        )
    mixed = dtype == torch.bfloat16
    return ShardingOptions(
        cpu_offload=bool(cfg.fsdp_cpu_offload),
        student_reshard_after_forward=bool(cfg.fsdp_reshard_after_forward),
        teacher_reshard_after_forward=bool(cfg.fsdp_teacher_reshard_after_forward),
        param_dtype=torch.bfloat16 if mixed else None,
        reduce_dtype=torch.float32 if mixed else None,
    )


def _warn_unused_fsdp_options(cfg: DictConfig) -> None:
    if cfg.get("fsdp_cpu_offload"):
        warnings.warn(
            "fsdp_cpu_offload = true has no effect in a single process (nothing is sharded): "
            "launch with --nproc_per_node N > 1, or set it to false",
            stacklevel=3,
        )


def _only_warnings(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING


def _quiet_this_process() -> None:
    """Ranks other than 0 log warnings and errors only, and no Python warnings.

    A filter, not a level: torchtune's ``get_logger(level)`` resets the shared logger's level
    whenever it is called.
    """
    logger = utils.get_logger()
    if _only_warnings not in logger.filters:
        logger.addFilter(_only_warnings)
    warnings.simplefilter("ignore")


def set_determinism(seed: int | None, deterministic: bool, device: torch.device) -> int:
    """Seed every generator (torch, numpy, random) with ``seed + rank``; optionally demand
    deterministic kernels.

    Returns:
        The run's seed (the same on every rank; drawn at random on rank 0 when ``seed`` is
        None). The data order uses it, so every rank shuffles the same permutation.
    """
    if deterministic and device.type == "cuda":
        # cuBLAS needs this before its first use to be deterministic.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    return training.set_seed(seed=seed, debug_mode="warn" if deterministic else None)


# --------------------------------------------------------------------------------------------
# Models: build on meta, adapters, wrap and shard, load
# --------------------------------------------------------------------------------------------


def build_model(node: DictConfig, dtype: torch.dtype) -> nn.Module:
    """Instantiate a model on the meta device in the run's dtype: no memory, no random init.

    :func:`load_weights` allocates it (each rank only its shards) and fills it.
    """
    with training.set_default_dtype(dtype), torch.device("meta"):
        return config.instantiate(node)


def load_student_weights(
    model: nn.Module,
    base_state_dict: dict[str, Tensor],
    adapter_state_dict: dict[str, Tensor] | None,
    *,
    seed: int = 0,
) -> bool:
    """Load a single-process student (evaluation tools); for LoRA/DoRA freeze all but adapters.

    The same steps as the recipe's (:func:`freeze_all_but_adapters`, :func:`student_state_dict`,
    a strict full load) for a model built on a device or on meta.

    Returns:
        True for a LoRA/DoRA student.

    Raises:
        ValueError: when a weight is missing or unexpected.
    """
    is_lora = freeze_all_but_adapters(model)
    state = student_state_dict(model, base_state_dict, adapter_state_dict, seed=seed)
    device = next(model.parameters()).device
    state_dicts.load_full_state_dict(
        model,
        state,
        device="cpu" if device.type == "meta" else device,
        strict=True,
        broadcast_from_rank0=False,
    )
    return is_lora


def prepare_student(
    model: nn.Module, runtime: Runtime, *, activation_checkpointing: bool, compile_layers: bool
) -> nn.Module:
    """Activation checkpointing, per-layer compile, then FSDP2 sharding (in that order).

    In one process nothing is sharded.
    """
    if activation_checkpointing:
        parallel.apply_activation_checkpointing(model)
    if compile_layers:
        parallel.apply_compile(model, backend=parallel.compile_backend())
    return _shard(model, runtime.sharding, trainable=True)


def prepare_teacher_for_sharding(
    model: nn.Module, runtime: Runtime, *, compile_layers: bool
) -> nn.Module:
    """Freeze every parameter (its shards never hold or reduce gradients), per-layer compile,
    then FSDP2 sharding. No activation checkpointing: nothing runs backward through it."""
    if compile_layers:
        parallel.apply_compile(model, backend=parallel.compile_backend())
    return _shard(model, runtime.sharding, trainable=False)


def _shard(model: nn.Module, options: ShardingOptions, *, trainable: bool) -> nn.Module:
    return parallel.shard_model(
        model,
        trainable=trainable,
        reshard_after_forward=(
            options.student_reshard_after_forward
            if trainable
            else options.teacher_reshard_after_forward
        ),
        cpu_offload=options.cpu_offload,
        param_dtype=options.param_dtype,
        reduce_dtype=options.reduce_dtype,
    )


@contextmanager
def _random_state_kept(device: torch.device) -> Iterator[None]:
    """Allocating a meta model initialises (then overwrites) some parameters; how many random
    numbers that draws depends on the sharding, so the run's generators are restored after."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        yield


class NonFiniteWeightsError(ValueError):
    """Weights to load hold NaN or inf; the message names the tensor and where it came from."""


def non_finite_tensor(state_dict: dict[str, Any]) -> str | None:
    """The first floating-point tensor of ``state_dict`` holding NaN or inf, described
    (name, counts), or None. Reads every tensor once; no copy beyond one bool mask at a time."""
    for name, value in state_dict.items():
        if not isinstance(value, Tensor) or not value.is_floating_point():
            continue
        finite = torch.isfinite(value)
        if bool(finite.all()):
            continue
        nans = int(torch.isnan(value).sum())
        return (
            f"tensor {name!r} {tuple(value.shape)} holds {nans} NaN and "
            f"{value.numel() - int(finite.sum()) - nans} inf values"
        )
    return None


def load_weights(
    model: nn.Module,
    state_dict: dict[str, Tensor] | None,
    runtime: Runtime,
    source: str | os.PathLike = "the checkpoint",
) -> None:
    """Allocate a meta (possibly sharded) model and load a full state dict into it, strictly.

    Only rank 0 passes ``state_dict`` (others None): it is checked for NaN/inf, broadcast, and
    every rank keeps its shards, on ``runtime.parameter_device``.

    Args:
        source: where the weights come from (a folder), for the error message.

    Raises:
        NonFiniteWeightsError: a tensor holds NaN or inf (on every rank, before loading).
        ValueError: a key is missing or unexpected (on every rank).
    """
    problem = non_finite_tensor(state_dict) if state_dict is not None else None
    problem = process_group.broadcast_object(problem)
    if problem is not None:
        raise NonFiniteWeightsError(
            f"{problem} in the weights loaded from {source}: refusing to train on them; load "
            "weights saved before the values diverged (e.g. resume_from_checkpoint=<an earlier "
            "step_N folder>) or fix the checkpoint"
        )
    with _random_state_kept(runtime.device):
        state_dicts.load_full_state_dict(
            model,
            state_dict,
            device=runtime.parameter_device,
            strict=True,
            broadcast_from_rank0=True,
        )


def finish_teacher(model: nn.Module, quantization: str | None) -> nn.Module:
    """Eval mode, and optionally int8 weights (single process; the teacher is already frozen).

    ``int8_weight_only`` (torchao) stores the transformer layers' linear weights in int8 with
    one scale per output row, halving their memory against bf16; embeddings and the output
    projection stay in the run's dtype (the fused loss reads the output weight directly).
    """
    model.eval()
    if quantization == "int8_weight_only":
        quantize_int8_weight_only(model)
    return model


def prepare_teacher(
    model: nn.Module, state_dict: dict[str, Tensor], quantization: str | None
) -> nn.Module:
    """A materialised single-process teacher (tools, tests): load strictly, freeze, then
    :func:`finish_teacher`. The recipe does the same around sharding."""
    model.requires_grad_(False)
    device = next(model.parameters()).device
    state_dicts.load_full_state_dict(
        model, state_dict, device=device, strict=True, broadcast_from_rank0=False
    )
    return finish_teacher(model, quantization)


def quantize_int8_weight_only(model: nn.Module) -> None:
    """torchao weight-only int8 on the ``nn.Linear`` layers inside ``model.layers``."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    # Version 1 (AffineQuantizedTensor), on purpose: in torchao 0.15 on CPU, version 2
    # (Int8Tensor) with bf16 activations gives about 11% relative error per linear layer
    # (version 1: under 1%); the tiny teacher then agrees with its bf16 self on 58-94% of top-1
    # predictions instead of 96-99%.
    # tests/test_recipe.py::test_int8_teacher_stays_close_to_the_bf16_teacher guards this.
    try:
        quant_config = Int8WeightOnlyConfig(version=1)
    except TypeError:  # torchao releases before versioned configs
        quant_config = Int8WeightOnlyConfig()

    def in_layers(module: nn.Module, name: str) -> bool:
        return isinstance(module, nn.Linear) and name.startswith("layers.")

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*version 1 of Int8WeightOnlyConfig.*")
        quantize_(model, quant_config, filter_fn=in_layers)


def setup_profiler(node: DictConfig | None) -> Any:
    """torchtune's profiler from the ``profiler`` node (``setup_torch_profiler``; with
    ``enabled: false`` or no node, its no-op ``DummyProfiler``). Call ``start()``, ``step()``
    after each optimizer step and ``stop()``, as torchtune's recipes do."""
    if node is None:
        return training.DummyProfiler()
    profiler, _ = config.instantiate(node)
    return profiler


def memory_stats_reader(enabled: bool, device: torch.device) -> Callable[[], dict] | None:
    """``log_peak_memory_stats``: torchtune's ``get_memory_stats`` (peak active, allocated and
    reserved GiB since the last read) on CUDA; on CPU, as in torchtune, a warning and none."""
    if not enabled:
        return None
    if device.type == "cpu":
        warnings.warn(
            "log_peak_memory_stats = true has no effect on CPU (the metrics already hold each "
            "rank's peak resident memory): set it to false",
            stacklevel=2,
        )
        return None
    return lambda: training.get_memory_stats(device=device)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
