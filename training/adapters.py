"""LoRA/DoRA students: which parameters are adapters, their fresh values, and their merge.

Everything the recipe, the checkpoints and the evaluation tools need to know about adapters
lives here: the adapter parameter names and freezing the base, fresh adapter values that are
the same for any process count, the student's full start state, the shared rank, alpha and
dropout, and the DoRA bias scaling torchtune's merge leaves out.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torchtune.modules.peft import get_adapter_params, get_merged_lora_ckpt, set_trainable_params

from kdtune.training.checkpoint import state_dicts


def lora_rank_and_alpha(model: nn.Module) -> tuple[int, float]:
    """The (shared) rank and alpha of a LoRA/DoRA model's adapters, for merging."""
    pairs: set[tuple[int, float]] = set()
    for module in model.modules():
        lora_a = getattr(module, "lora_a", None)
        if isinstance(lora_a, nn.Linear):
            rank = lora_a.out_features
            alpha = getattr(module, "alpha", None)
            if alpha is None:  # DoRALinear keeps only the scaling alpha / rank
                alpha = module.scaling * rank
            pairs.add((rank, float(alpha)))
    if len(pairs) != 1:
        raise ValueError(f"expected one LoRA rank/alpha in the model, found {sorted(pairs)}")
    return pairs.pop()


def lora_dropout(model: nn.Module) -> float:
    """The (shared) dropout probability of a LoRA/DoRA model's adapters (0 without dropout)."""
    probabilities = {
        module.dropout.p if isinstance(module.dropout, nn.Dropout) else 0.0
        for module in model.modules()
        if isinstance(getattr(module, "lora_a", None), nn.Linear)
    }
    if len(probabilities) != 1:
        raise ValueError(f"expected one LoRA dropout in the model, found {sorted(probabilities)}")
    return probabilities.pop()


def is_dora(model: nn.Module) -> bool:
    return any(hasattr(module, "initialize_dora_magnitude") for module in model.modules())


def dora_scales_a_bias(model: nn.Module) -> bool:
    """Whether a DoRA adapter sits on a layer with a bias (Qwen2's q/k/v).

    torchtune's ``DoRALinear`` scales its whole base output, bias included, by
    ``magnitude / norm``; PEFT's DoRA (as the paper) leaves the bias out, so no PEFT adapter
    reproduces such a student.
    """
    return any(
        hasattr(module, "initialize_dora_magnitude") and getattr(module, "use_bias", False)
        for module in model.modules()
    )


def dora_scaled_biases(state: dict[str, Tensor], rank: int, alpha: float) -> dict[str, Tensor]:
    """The biases of DoRA layers as ``DoRALinear`` applies them: ``bias [out]`` times
    ``magnitude [out] / ||W + (alpha / rank) B A||`` (row norms). torchtune's
    ``get_merged_lora_ckpt`` scales the weight only, which changes such a student's outputs."""
    scaled = {}
    for key, magnitude in state.items():
        module = key.removesuffix(".magnitude")
        if module == key or f"{module}.bias" not in state:
            continue
        lora_a = state[f"{module}.lora_a.weight"]
        lora_b = state[f"{module}.lora_b.weight"]
        weight = state[f"{module}.weight"].to(lora_a.dtype) + (alpha / rank) * lora_b @ lora_a
        bias = state[f"{module}.bias"]
        scaled[f"{module}.bias"] = bias * (magnitude / torch.linalg.norm(weight, dim=1)).to(
            bias.dtype
        )
    return scaled


def adapter_parameter_names(model: nn.Module) -> set[str]:
    """Names of LoRA/DoRA parameters (empty for a full-parameter model)."""
    return set(get_adapter_params(model))


def freeze_all_but_adapters(model: nn.Module) -> bool:
    """A LoRA/DoRA student trains only its adapters; call before sharding.

    Returns:
        True for a LoRA/DoRA student (False: every parameter stays trainable).
    """
    adapters = adapter_parameter_names(model)
    if adapters:
        set_trainable_params(model, adapters)
    return bool(adapters)


def fresh_adapter_state_dict(
    model: nn.Module, base_state_dict: dict[str, Tensor], seed: int
) -> dict[str, Tensor]:
    """Initial LoRA/DoRA adapter values as full CPU tensors, the same for any process count.

    Each adapter module is copied to the CPU and initialised by torchtune's own code
    (``initialize_parameters``: Kaiming-uniform A, zero B), drawing from a generator seeded
    with ``seed`` (the global one is left untouched); a DoRA magnitude is computed from the
    module's base weight in ``base_state_dict`` (``initialize_dora_magnitude``). Initialising
    the sharded model instead would draw different numbers for different shardings.

    Args:
        model: the student (on meta or materialised; not yet wrapped or sharded).
        base_state_dict: the base weights, torchtune keys.
        seed: the run's seed.
    """
    state: dict[str, Tensor] = {}
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for name, module in model.named_modules():
            if not callable(getattr(module, "adapter_params", None)):
                continue
            fresh = copy.deepcopy(module)
            # LoRA/DoRA's to_empty allocates only the adapters (the base weight stays on meta).
            fresh.to_empty(device="cpu")
            fresh.initialize_parameters()
            if hasattr(fresh, "initialize_dora_magnitude"):
                base = base_state_dict[state_dicts.state_dict_key(f"{name}.weight")]
                fresh.weight = nn.Parameter(base.to("cpu", fresh.weight.dtype), requires_grad=False)
                fresh.initialize_dora_magnitude()
            for parameter_name in fresh.adapter_params():
                key = state_dicts.state_dict_key(f"{name}.{parameter_name}")
                state[key] = fresh.get_parameter(parameter_name).detach().clone()
    return state


def student_state_dict(
    model: nn.Module,
    base_state_dict: dict[str, Tensor],
    adapter_state_dict: dict[str, Tensor] | None,
    *,
    seed: int,
) -> dict[str, Tensor]:
    """Everything the student loads: its weights, plus adapters for a LoRA/DoRA student.

    Args:
        base_state_dict: the full weights (full student) or the base weights (LoRA/DoRA).
        adapter_state_dict: saved adapters (resume), or None for fresh ones
            (:func:`fresh_adapter_state_dict` with ``seed``). Ignored for a full student.
    """
    if not adapter_parameter_names(model):
        return base_state_dict
    adapters = adapter_state_dict
    if adapters is None:
        adapters = fresh_adapter_state_dict(model, base_state_dict, seed)
    return {**base_state_dict, **adapters}


def merged_state_dict(state: dict[str, Tensor], rank: int, alpha: float) -> dict[str, Tensor]:
    """A LoRA/DoRA state dict merged into plain weights, as the student computes its outputs.

    Each adapted layer's weight (and, for DoRA, its bias: :func:`dora_scaled_biases`) is merged
    in fp32 and rounded once to the weight's own dtype: merging bf16 tensors in bf16 would
    round ``B @ A``, the sum and the DoRA scale separately. ``state`` is left unchanged;
    the other entries are passed through as they are.
    """
    modules = {
        key.removesuffix(".lora_a.weight") for key in state if key.endswith(".lora_a.weight")
    }
    parts = (".weight", ".bias", ".lora_a.weight", ".lora_b.weight", ".magnitude")
    fp32 = {
        f"{module}{part}": state[f"{module}{part}"].to(torch.float32, copy=True)
        for module in modules
        for part in parts
        if f"{module}{part}" in state
    }
    work = {**state, **fp32}
    biases = dora_scaled_biases(work, rank, alpha)
    merged = get_merged_lora_ckpt(work, rank=rank, alpha=alpha)
    merged.update(biases)
    for module in modules:
        for part in (".weight", ".bias"):
            key = f"{module}{part}"
            if key in merged:
                merged[key] = merged[key].to(state[key].dtype)
    return merged
