"""FSDP2 checks of ``kdtune.training.{parallel,state_dicts}``, run by torchrun (2 processes, gloo, CPU).

Launched by ``tests/test_distributed.py``::

    python -m torch.distributed.run --standalone --nproc_per_node 2 \
        tests/dist_workers/fsdp_checks.py --out DIR

Every rank builds the same unsharded reference model (same seed) and computes the reference
results itself; the sharded model is compared with it. Rank 0 writes ``DIR/results.json``
(numbers and booleans the test asserts on) and ``DIR/resume.pt`` (a saved model + optimizer
state, the next batch and the parameters after the next step, for the single-process resume
check in the test). Not a test module: pytest does not collect it.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torchtune.models.llama3 import llama3, lora_llama3
from torchtune.modules.peft import get_adapter_params, set_trainable_params

from kdtune.training import console, metrics, parallel, process_group
from kdtune.training.checkpoint import state_dicts

VOCAB = 256
IGNORE = -100
DIMS = {
    "vocab_size": VOCAB,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "embed_dim": 64,
    "intermediate_dim": 128,
    "max_seq_len": 32,
}


def build_model() -> nn.Module:
    return llama3(**DIMS)


def build_lora_model() -> nn.Module:
    return lora_llama3(["q_proj", "v_proj"], lora_rank=4, lora_alpha=8, **DIMS)


def reference_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model()


def sharded_model(
    full_sd: dict[str, Tensor],
    *,
    builder: Callable[[], nn.Module] = build_model,
    trainable: bool = True,
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
    broadcast_from_rank0: bool = True,
    strict: bool = True,
    before_shard: Callable[[nn.Module], None] | None = None,
) -> tuple[nn.Module, Any]:
    """Meta build -> (optional wrapping) -> shard -> load; rank 0 alone passes the weights when
    ``broadcast_from_rank0``."""
    with torch.device("meta"):
        model = builder()
    if before_shard is not None:
        before_shard(model)
    parallel.shard_model(
        model,
        trainable=trainable,
        reshard_after_forward=reshard_after_forward,
        cpu_offload=cpu_offload,
        param_dtype=param_dtype,
        reduce_dtype=reduce_dtype,
    )
    given = full_sd if (process_group.is_main_process() or not broadcast_from_rank0) else None
    keys = state_dicts.load_full_state_dict(
        model, given, device="cpu", strict=strict, broadcast_from_rank0=broadcast_from_rank0
    )
    return model, keys


def make_batch(seed: int, batch: int = 4, seq: int = 12) -> tuple[Tensor, Tensor]:
    """Tokens and labels ``[batch, seq]``; the first half of the batch has far more ignored
    labels than the second, so the two ranks' token counts differ (a per-rank mean would then
    not equal the global mean)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batch, seq), generator=gen)
    labels = torch.randint(0, VOCAB, (batch, seq), generator=gen)
    ignore_prob = torch.tensor([0.7] * (batch // 2) + [0.1] * (batch - batch // 2))
    ignored = torch.rand(batch, seq, generator=gen) < ignore_prob[:, None]
    labels[ignored] = IGNORE
    return tokens, labels


def ce_sum(model: nn.Module, tokens: Tensor, labels: Tensor) -> Tensor:
    logits = model(tokens)
    return F.cross_entropy(
        logits.float().reshape(-1, VOCAB), labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )


def rank_slice(x: Tensor, rank: int, world: int) -> Tensor:
    per_rank = x.shape[0] // world
    return x[rank * per_rank : (rank + 1) * per_rank]


def full_grads(model: nn.Module) -> dict[str, Tensor]:
    grads = {}
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        grad = param.grad
        grads[state_dicts.state_dict_key(name)] = (
            grad.full_tensor() if isinstance(grad, DTensor) else grad
        )
    return grads


def max_abs_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    if set(a) != set(b):
        return float("inf")
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def distributed_backward(model: nn.Module, tokens: Tensor, labels: Tensor, micro: int) -> float:
    """This rank's half of the batch, in ``micro`` micro-batches, each loss divided by the
    global count of non-ignored tokens. Returns the global mean loss."""
    rank, world = process_group.world_size_and_rank()[1], process_group.world_size_and_rank()[0]
    my_tokens, my_labels = rank_slice(tokens, rank, world), rank_slice(labels, rank, world)
    micro_tokens, micro_labels = my_tokens.chunk(micro), my_labels.chunk(micro)
    local_count = sum((lab != IGNORE).sum() for lab in micro_labels)
    global_count = process_group.all_reduce_sum(local_count)
    total = torch.zeros(())
    for tok, lab in zip(micro_tokens, micro_labels):
        loss = ce_sum(model, tok, lab) / global_count
        loss.backward()
        total += loss.detach()
    return process_group.all_reduce_sum(total).item()


def reference_backward(model: nn.Module, tokens: Tensor, labels: Tensor) -> float:
    loss = ce_sum(model, tokens, labels) / (labels != IGNORE).sum()
    loss.backward()
    return loss.item()


def check_sharding_and_state(ref: nn.Module, full_sd: dict[str, Tensor]) -> dict[str, Any]:
    tokens, _ = make_batch(1)
    out: dict[str, Any] = {}
    with torch.no_grad():
        expected = ref(tokens)
    for broadcast in (True, False):
        model, keys = sharded_model(full_sd, broadcast_from_rank0=broadcast)
        tag = "broadcast" if broadcast else "every_rank"
        with torch.no_grad():
            out[f"forward_max_diff_{tag}"] = (model(tokens) - expected).abs().max().item()
        out[f"all_params_dtensor_{tag}"] = all(isinstance(p, DTensor) for p in model.parameters())
        out[f"missing_{tag}"] = list(keys.missing_keys)
        gathered = state_dicts.gather_full_state_dict(model, trainable_only=False)
        if process_group.is_main_process():
            out[f"gather_same_keys_{tag}"] = sorted(gathered) == sorted(full_sd)
            out[f"gather_bitwise_{tag}"] = all(
                torch.equal(gathered[k], full_sd[k]) for k in full_sd
            )
        else:
            out[f"gather_nonmain_is_none_{tag}"] = gathered is None
    out["gather_nonmain_is_none"] = process_group.gather_from_ranks(
        float(out.get("gather_nonmain_is_none_broadcast", True))
    )
    unsharded_bytes = sum(p.numel() * p.element_size() for p in ref.parameters())
    out["local_bytes_fraction"] = process_group.gather_from_ranks(
        parallel.local_parameter_bytes(model) / unsharded_bytes
    )
    out["unsharded_bytes_single_process_formula"] = unsharded_bytes
    return out


def check_gradients_and_resume(ref: nn.Module, full_sd: dict[str, Tensor], out_dir: Path):
    out: dict[str, Any] = {}
    tokens, labels = make_batch(2)
    model, _ = sharded_model(full_sd)
    out["distributed_loss"] = distributed_backward(model, tokens, labels, micro=2)
    out["reference_loss"] = reference_backward(ref, tokens, labels)
    sharded_grads, reference_grads = full_grads(model), full_grads(ref)
    out["grad_max_abs_diff"] = max_abs_diff(sharded_grads, reference_grads)
    out["grad_max_abs"] = max(g.abs().max().item() for g in reference_grads.values())
    out["grad_param_count"] = [len(sharded_grads), len(reference_grads)]

    # Clipping: the global norm covers both ranks' shards.
    max_norm = 0.5
    out["clip_norm"] = parallel.clip_grad_norm_(model, max_norm).item()
    out["clip_norm_reference"] = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm).item()
    out["clipped_grad_max_abs_diff"] = max_abs_diff(full_grads(model), full_grads(ref))

    # Optimizer: step, save (gathered), step again = "uninterrupted".
    def make_optimizer(params):
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)

    optimizer = make_optimizer(model.parameters())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    saved_model = state_dicts.gather_full_state_dict(model, trainable_only=False)
    saved_optim = state_dicts.gather_full_optimizer_state_dict(model, optimizer)
    next_tokens, next_labels = make_batch(3)
    distributed_backward(model, next_tokens, next_labels, micro=1)
    optimizer.step()
    uninterrupted = state_dicts.gather_full_state_dict(model, trainable_only=False)
    saved_step_after = (
        saved_optim["state"]["tok_embeddings.weight"]["step"].item()
        if process_group.is_main_process()
        else None
    )

    # Resume: a fresh sharded model + optimizer from rank 0's saved copies, one more step.
    resumed, _ = sharded_model(saved_model)
    resumed_optimizer = make_optimizer(resumed.parameters())
    state_dicts.load_full_optimizer_state_dict(
        resumed, resumed_optimizer, saved_optim, broadcast_from_rank0=True
    )
    distributed_backward(resumed, next_tokens, next_labels, micro=1)
    resumed_optimizer.step()
    after_resume = state_dicts.gather_full_state_dict(resumed, trainable_only=False)
    if process_group.is_main_process():
        out["resume_max_abs_diff"] = max_abs_diff(after_resume, uninterrupted)
        out["resume_bitwise"] = all(
            torch.equal(after_resume[k], uninterrupted[k]) for k in saved_model
        )
        out["step_moved_params"] = max_abs_diff(uninterrupted, saved_model)
        out["saved_optim_step_unchanged"] = saved_step_after == 1.0
        out["saved_optim_keys_are_names"] = sorted(saved_optim["state"]) == sorted(
            n for n, _ in ref.named_parameters()
        )
        torch.save(
            {
                "model": saved_model,
                "optimizer": saved_optim,
                "tokens": next_tokens,
                "labels": next_labels,
                "after_step": uninterrupted,
            },
            out_dir / "resume.pt",
        )
    return out


def check_frozen_teacher(ref: nn.Module, full_sd: dict[str, Tensor]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    tokens, _ = make_batch(4)
    with torch.no_grad():
        expected = ref(tokens)
    student, _ = sharded_model(full_sd)
    for reshard in (True, False):
        teacher, _ = sharded_model(
            full_sd, trainable=False, reshard_after_forward=reshard, broadcast_from_rank0=False
        )
        teacher.eval()
        tag = f"reshard_{reshard}"
        out[f"requires_grad_{tag}"] = any(p.requires_grad for p in teacher.parameters())
        diffs = []
        for _ in range(2):  # twice: the second forward must gather again (or reuse) correctly
            with torch.no_grad():
                diffs.append((teacher(tokens) - expected).abs().max().item())
        out[f"forward_max_diff_{tag}"] = max(diffs)
        out[f"sharded_after_no_grad_forward_{tag}"] = all(
            isinstance(p, DTensor) for p in teacher.parameters()
        )
        # Grad mode on (a recipe that forgets no_grad): still no graph through the teacher.
        teacher_logits = teacher(tokens)
        out[f"output_requires_grad_{tag}"] = teacher_logits.requires_grad
        student_logits = student(tokens)
        kd = (student_logits.log_softmax(-1) * teacher_logits.softmax(-1)).sum()
        kd.backward()
        out[f"teacher_grads_{tag}"] = sum(p.grad is not None for p in teacher.parameters())
        out[f"student_grads_{tag}"] = sum(p.grad is not None for p in student.parameters())
        out[f"requires_grad_after_{tag}"] = any(p.requires_grad for p in teacher.parameters())
    return out


def check_options(ref: nn.Module, full_sd: dict[str, Tensor]) -> dict[str, Any]:
    """CPU offload, bf16 mixed precision, activation checkpointing + compile."""
    out: dict[str, Any] = {}
    tokens, labels = make_batch(5)
    ref.zero_grad(set_to_none=True)
    reference_backward(ref, tokens, labels)
    reference_grads = full_grads(ref)

    offloaded, _ = sharded_model(full_sd, cpu_offload=True)
    distributed_backward(offloaded, tokens, labels, micro=1)
    out["offload_grad_max_abs_diff"] = max_abs_diff(full_grads(offloaded), reference_grads)
    before = state_dicts.gather_full_state_dict(offloaded, trainable_only=False)
    optimizer = torch.optim.AdamW(offloaded.parameters(), lr=1e-2)
    optimizer.step()
    after = state_dicts.gather_full_state_dict(offloaded, trainable_only=False)
    if process_group.is_main_process():
        out["offload_step_moved_params"] = max_abs_diff(after, before)

    mixed, _ = sharded_model(full_sd, param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    out["bf16_loss"] = distributed_backward(mixed, tokens, labels, micro=1)
    out["bf16_sharded_param_dtypes"] = sorted({str(p.dtype) for p in mixed.parameters()})
    out["bf16_grad_dtypes"] = sorted({str(p.grad.dtype) for p in mixed.parameters()})
    bf16_grads = full_grads(mixed)
    out["bf16_grad_rel_error"] = max(
        ((bf16_grads[k] - g).norm() / g.norm().clamp_min(1e-12)).item()
        for k, g in reference_grads.items()
    )

    def wrap(model: nn.Module) -> None:
        parallel.apply_activation_checkpointing(model)
        parallel.apply_compile(model, backend="eager")

    wrapped, _ = sharded_model(full_sd, before_shard=wrap)
    out["ac_compile_loss"] = distributed_backward(wrapped, tokens, labels, micro=1)
    out["ac_compile_grad_max_abs_diff"] = max_abs_diff(full_grads(wrapped), reference_grads)
    wrapped_sd = state_dicts.gather_full_state_dict(wrapped, trainable_only=False)
    if process_group.is_main_process():
        out["ac_compile_state_dict_keys_clean"] = sorted(wrapped_sd) == sorted(full_sd)
    with torch.no_grad():
        out["reference_loss_options"] = (
            ce_sum(ref, tokens, labels) / (labels != IGNORE).sum()
        ).item()
        return out


def check_lora(ref: nn.Module, full_sd: dict[str, Tensor]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    tokens, labels = make_batch(6)

    def freeze_base(model: nn.Module) -> None:
        set_trainable_params(model, get_adapter_params(model))

    lora, keys = sharded_model(
        full_sd, builder=build_lora_model, strict=False, before_shard=freeze_base
    )
    out["lora_missing_all_adapters"] = bool(keys.missing_keys) and all(
        ".lora_" in key for key in keys.missing_keys
    )
    out["lora_unexpected"] = list(keys.unexpected_keys)
    with torch.no_grad():
        out["lora_forward_max_diff"] = (lora(tokens) - ref(tokens)).abs().max().item()
    distributed_backward(lora, tokens, labels, micro=1)
    grads = full_grads(lora)
    out["lora_grad_names_all_adapters"] = bool(grads) and all(".lora_" in k for k in grads)
    adapters = state_dicts.gather_full_state_dict(lora, trainable_only=True)
    if process_group.is_main_process():
        out["lora_adapter_keys"] = sorted(adapters)
        out["lora_adapter_keys_match_missing"] = sorted(adapters) == sorted(keys.missing_keys)
        out["lora_adapter_a_shape"] = list(adapters["layers.0.attn.q_proj.lora_a.weight"].shape)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    start = time.perf_counter()
    rank, world_size, _ = process_group.init_distributed("cpu")
    results: dict[str, Any] = {
        "world_size": world_size,
        "ranks_is_main": process_group.gather_from_ranks(float(rank == 0)),
    }
    ref = reference_model(seed=0)
    full_sd = {k: v.clone() for k, v in ref.state_dict().items()}
    checks = {
        "sharding": lambda: check_sharding_and_state(ref, full_sd),
        "gradients_resume": lambda: check_gradients_and_resume(
            reference_model(seed=0), full_sd, args.out
        ),
        "teacher": lambda: check_frozen_teacher(ref, full_sd),
        "options": lambda: check_options(reference_model(seed=0), full_sd),
        "lora": lambda: check_lora(ref, full_sd),
    }
    for name, check in checks.items():
        check_start = time.perf_counter()
        results[name] = check()
        results[name]["seconds"] = time.perf_counter() - check_start
    results["peak_memory_gib"] = process_group.gather_from_ranks(metrics.peak_memory_gib("cpu"))
    results["seconds"] = time.perf_counter() - start
    if rank == 0:
        (args.out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    process_group.teardown()


if __name__ == "__main__":
    main()
    console.exit_recipe(0)  # as the recipe ends: no interpreter teardown after the group
