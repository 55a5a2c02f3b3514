"""Tests of the process group, per-layer parallelism and state dicts (``kdtune.training.{process_group,parallel,state_dicts}``): FSDP2 on CPU/gloo with 2 processes, and the
single-process behaviour of every function (the recipe calls the same functions either way).

The multi-process checks run in ONE torchrun launch (``tests/dist_workers/fsdp_checks.py``);
its JSON results are shared by the ``distributed`` tests below through a module fixture.
Every reference there is an unsharded model computed by each rank itself.
"""

from __future__ import annotations

import importlib.util
import json
import resource
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torchtune.models.llama3 import llama3, lora_llama3
from torchtune.modules.peft import get_adapter_params, set_trainable_params

from kdtune.training import data, metrics, parallel, process_group
from kdtune.training.checkpoint import state_dicts

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "dist_workers" / "fsdp_checks.py"
VOCAB = 256
DIMS = {
    "vocab_size": VOCAB,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "embed_dim": 64,
    "intermediate_dim": 128,
    "max_seq_len": 32,
}


def tiny_llama(seed: int | None = 0) -> nn.Module:
    if seed is not None:
        torch.manual_seed(seed)
    return llama3(**DIMS)


def tiny_lora(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = lora_llama3(["q_proj", "v_proj"], lora_rank=4, lora_alpha=8, **DIMS)
    set_trainable_params(model, get_adapter_params(model))
    return model


def tokens_and_labels(seed: int, batch: int = 2, seq: int = 8) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batch, seq), generator=gen)
    labels = torch.randint(0, VOCAB, (batch, seq), generator=gen)
    labels[:, :2] = -100
    return tokens, labels


def mean_ce(model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = model(tokens).float().reshape(-1, VOCAB)
    return F.cross_entropy(logits, labels.reshape(-1), ignore_index=-100)


def tiny_llama_parameter_count() -> int:
    """Independent of the code under test: the llama3 parameter count from its dimensions."""
    d, v, h = DIMS["embed_dim"], DIMS["vocab_size"], DIMS["intermediate_dim"]
    head_dim = d // DIMS["num_heads"]
    attention = d * d * 2 + 2 * d * DIMS["num_kv_heads"] * head_dim  # q, output; k, v
    mlp = 3 * d * h
    norms = 2 * d
    return 2 * v * d + DIMS["num_layers"] * (attention + mlp + norms) + d  # + final norm


# --------------------------------------------------------------------------------------------
# Two processes (one torchrun launch shared by the tests below)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory: pytest.TempPathFactory, launch) -> tuple[dict[str, Any], Path]:
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("this torch build has no torch.distributed gloo backend")
    out = tmp_path_factory.mktemp("fsdp_checks")
    launch.torchrun(WORKER, "--out", str(out), cwd=REPO)
    return json.loads((out / "results.json").read_text()), out


@pytest.mark.distributed
@pytest.mark.slow
def test_two_processes_ran(fsdp):
    results, _ = fsdp
    assert results["world_size"] == 2
    assert results["ranks_is_main"] == [1.0, 0.0]
    assert all(gib > 0 for gib in results["peak_memory_gib"])


@pytest.mark.distributed
@pytest.mark.slow
def test_sharded_forward_equals_unsharded_and_gather_round_trips(fsdp):
    sharding = fsdp[0]["sharding"]
    for tag in ("broadcast", "every_rank"):
        assert sharding[f"all_params_dtensor_{tag}"]
        assert sharding[f"missing_{tag}"] == []
        assert sharding[f"forward_max_diff_{tag}"] <= 1e-6
        assert sharding[f"gather_same_keys_{tag}"]
        assert sharding[f"gather_bitwise_{tag}"]
    assert sharding["gather_nonmain_is_none"] == [1.0, 1.0]


@pytest.mark.distributed
@pytest.mark.slow
def test_each_rank_holds_half_the_parameter_bytes(fsdp):
    sharding = fsdp[0]["sharding"]
    assert sharding["unsharded_bytes_single_process_formula"] == tiny_llama_parameter_count() * 4
    for fraction in sharding["local_bytes_fraction"]:
        assert fraction == pytest.approx(0.5, abs=0.03)


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_half_batch_give_full_batch_gradients(fsdp):
    grads = fsdp[0]["gradients_resume"]
    assert grads["grad_param_count"] == [21, 21]
    assert grads["distributed_loss"] == pytest.approx(grads["reference_loss"], abs=1e-6)
    # FSDP2's default (averaging over ranks) would halve every gradient: a gap of ~grad_max_abs.
    assert grads["grad_max_abs"] > 1e-3
    assert grads["grad_max_abs_diff"] <= 1e-6
    assert grads["clip_norm"] == pytest.approx(grads["clip_norm_reference"], rel=1e-6)
    assert grads["clipped_grad_max_abs_diff"] <= 1e-6


@pytest.mark.distributed
@pytest.mark.slow
def test_optimizer_state_gather_and_load_resume_exactly(fsdp):
    grads = fsdp[0]["gradients_resume"]
    assert grads["step_moved_params"] > 1e-3  # the compared step did change the weights
    assert grads["resume_bitwise"], grads["resume_max_abs_diff"]
    assert grads["saved_optim_step_unchanged"]  # the saved copy is not the live state
    assert grads["saved_optim_keys_are_names"]


@pytest.mark.distributed
@pytest.mark.slow
def test_two_rank_checkpoint_resumes_in_one_process(fsdp):
    """The gathered model + optimizer state is portable: one process continues the 2-rank run."""
    saved = torch.load(fsdp[1] / "resume.pt", weights_only=True)
    with torch.device("meta"):
        model = tiny_llama(seed=None)
    state_dicts.load_full_state_dict(
        model, saved["model"], device="cpu", strict=True, broadcast_from_rank0=True
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    state_dicts.load_full_optimizer_state_dict(
        model, optimizer, saved["optimizer"], broadcast_from_rank0=True
    )
    mean_ce(model, saved["tokens"], saved["labels"]).backward()
    optimizer.step()
    for key, expected in saved["after_step"].items():
        torch.testing.assert_close(model.state_dict()[key], expected, atol=1e-6, rtol=0)


@pytest.mark.distributed
@pytest.mark.slow
def test_frozen_teacher_never_has_gradients(fsdp):
    teacher = fsdp[0]["teacher"]
    for reshard in (True, False):
        tag = f"reshard_{reshard}"
        assert teacher[f"requires_grad_{tag}"] is False
        assert teacher[f"requires_grad_after_{tag}"] is False
        assert teacher[f"forward_max_diff_{tag}"] <= 1e-6
        assert teacher[f"output_requires_grad_{tag}"] is False
        assert teacher[f"teacher_grads_{tag}"] == 0
        assert teacher[f"student_grads_{tag}"] == 21
    assert teacher["sharded_after_no_grad_forward_reshard_True"] is True


@pytest.mark.distributed
@pytest.mark.slow
def test_cpu_offload_mixed_precision_checkpointing_and_compile(fsdp):
    options = fsdp[0]["options"]
    assert options["offload_grad_max_abs_diff"] <= 1e-6
    assert options["offload_step_moved_params"] > 1e-3
    assert options["bf16_sharded_param_dtypes"] == ["torch.float32"]  # fp32 master weights
    assert options["bf16_grad_dtypes"] == ["torch.float32"]
    assert options["bf16_grad_rel_error"] < 0.05  # bf16 compute: close, not equal
    assert options["bf16_loss"] == pytest.approx(options["reference_loss_options"], abs=0.02)
    assert options["ac_compile_grad_max_abs_diff"] <= 1e-6
    assert options["ac_compile_loss"] == pytest.approx(options["reference_loss_options"], abs=1e-6)
    assert options["ac_compile_state_dict_keys_clean"]


@pytest.mark.distributed
@pytest.mark.slow
def test_lora_student_shards_loads_base_and_gathers_adapters(fsdp):
    lora = fsdp[0]["lora"]
    assert lora["lora_missing_all_adapters"]
    assert lora["lora_unexpected"] == []
    assert lora["lora_forward_max_diff"] <= 1e-6  # B = 0: the base model's output
    assert lora["lora_grad_names_all_adapters"]
    assert lora["lora_adapter_keys_match_missing"]
    assert len(lora["lora_adapter_keys"]) == 2 * 2 * 2  # layers x (q, v) x (A, B)
    assert lora["lora_adapter_a_shape"] == [4, DIMS["embed_dim"]]  # full, not a shard


# --------------------------------------------------------------------------------------------
# One process: the same calls as no-ops or their trivial equivalents
# --------------------------------------------------------------------------------------------


def test_init_distributed_without_torchrun_is_a_single_process(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert process_group.init_distributed("cpu") == (0, 1, torch.device("cpu"))
    assert not process_group.is_distributed()
    assert process_group.world_size_and_rank() == (1, 0)
    assert process_group.is_main_process()
    process_group.barrier()
    process_group.teardown()


def test_init_distributed_refuses_one_gpu_index_for_several_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ValueError, match="cuda:1"):
        process_group.init_distributed("cuda:1")


def test_all_reduce_sum_and_gather_from_ranks_single_process():
    value = torch.tensor([1.5, 2.0], requires_grad=True)
    summed = process_group.all_reduce_sum(value)
    assert torch.equal(summed, value.detach())
    assert summed is not value and not summed.requires_grad
    summed += 1
    assert torch.equal(value.detach(), torch.tensor([1.5, 2.0]))
    assert process_group.gather_from_ranks(3.25) == [3.25]


def test_shard_model_single_process_only_freezes_a_teacher():
    model = tiny_llama()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    parallel.shard_model(
        model,
        trainable=True,
        reshard_after_forward=True,
        cpu_offload=False,
        param_dtype=None,
        reduce_dtype=None,
    )
    assert all(type(p) is nn.Parameter and p.requires_grad for p in model.parameters())
    parallel.shard_model(
        model,
        trainable=False,
        reshard_after_forward=False,
        cpu_offload=True,
        param_dtype=torch.bfloat16,
        reduce_dtype=torch.float32,
    )
    assert not any(p.requires_grad for p in model.parameters())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    assert parallel.local_parameter_bytes(model) == tiny_llama_parameter_count() * 4


def test_transformer_layers_are_the_outermost_layers_entries():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(2, 2)])  # nested: part of its block

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.decoder = nn.Module()
            self.decoder.layers = nn.ModuleList([Block(), Block()])

    names = [name for name, _ in parallel.transformer_layers(Model())]
    assert names == ["decoder.layers.0", "decoder.layers.1"]


def test_shard_model_requires_transformer_layers():
    with pytest.raises(ValueError, match="layers"):
        parallel.shard_model(
            nn.Linear(2, 2),
            trainable=True,
            reshard_after_forward=True,
            cpu_offload=False,
            param_dtype=None,
            reduce_dtype=None,
        )
    with pytest.raises(ValueError, match="layers"):
        parallel.apply_activation_checkpointing(nn.Linear(2, 2))


def test_load_full_state_dict_materialises_a_meta_model():
    reference = tiny_llama(seed=3)
    full_sd = reference.state_dict()
    snapshot = dict(full_sd)
    with torch.device("meta"):
        model = tiny_llama(seed=None)
    keys = state_dicts.load_full_state_dict(
        model, full_sd, device="cpu", strict=True, broadcast_from_rank0=True
    )
    assert keys.missing_keys == [] and keys.unexpected_keys == []
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert full_sd.keys() == snapshot.keys() and all(full_sd[k] is snapshot[k] for k in full_sd)
    tokens, _ = tokens_and_labels(0)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference(tokens), atol=0, rtol=0)


def test_materialize_refuses_a_partly_meta_model_and_skips_a_real_one():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state_dicts.materialize_meta_model(model, "cpu")  # nothing on meta: untouched
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    with torch.device("meta"):
        model.output = nn.Linear(DIMS["embed_dim"], VOCAB, bias=False)
    with pytest.raises(ValueError, match=r"1 of \d+ parameters/buffers are on the meta device"):
        state_dicts.materialize_meta_model(model, "cpu")


def test_state_dict_key_strips_wrapper_prefixes():
    assert (
        state_dicts.state_dict_key(
            "layers.0._checkpoint_wrapped_module._orig_mod.attn.q_proj.weight"
        )
        == "layers.0.attn.q_proj.weight"
    )
    assert state_dicts.state_dict_key("tok_embeddings.weight") == "tok_embeddings.weight"


def test_load_full_state_dict_strict_and_lenient_key_checks():
    full_sd = dict(tiny_llama().state_dict())
    removed = full_sd.pop("norm.scale")
    full_sd["extra.weight"] = removed
    with pytest.raises(
        ValueError, match=r"missing \['norm.scale'\].*unexpected \['extra.weight'\]"
    ):
        state_dicts.load_full_state_dict(
            tiny_llama(), full_sd, device="cpu", strict=True, broadcast_from_rank0=False
        )
    keys = state_dicts.load_full_state_dict(
        tiny_llama(), full_sd, device="cpu", strict=False, broadcast_from_rank0=False
    )
    assert keys.missing_keys == ["norm.scale"] and keys.unexpected_keys == ["extra.weight"]
    with pytest.raises(ValueError, match="full_state_dict is None"):
        state_dicts.load_full_state_dict(
            tiny_llama(), None, device="cpu", strict=True, broadcast_from_rank0=True
        )


def test_load_full_state_dict_casts_to_the_model_dtype():
    full_sd = tiny_llama().state_dict()
    with torch.device("meta"):
        model = tiny_llama(seed=None).to(torch.bfloat16)
    state_dicts.load_full_state_dict(
        model, full_sd, device="cpu", strict=True, broadcast_from_rank0=False
    )
    for key, value in model.state_dict().items():
        assert value.dtype == torch.bfloat16
        assert torch.equal(value, full_sd[key].to(torch.bfloat16))


def test_lora_meta_load_initialises_adapters_and_gathers_them():
    base = tiny_llama(seed=1)
    with torch.device("meta"):
        lora = lora_llama3(["q_proj", "v_proj"], lora_rank=4, lora_alpha=8, **DIMS)
    set_trainable_params(lora, get_adapter_params(lora))
    keys = state_dicts.load_full_state_dict(
        lora, base.state_dict(), device="cpu", strict=False, broadcast_from_rank0=True
    )
    assert keys.missing_keys and all(".lora_" in k for k in keys.missing_keys)
    tokens, _ = tokens_and_labels(1)
    with torch.no_grad():
        torch.testing.assert_close(lora(tokens), base(tokens), atol=1e-6, rtol=0)
    adapters = state_dicts.gather_full_state_dict(lora, trainable_only=True)
    assert sorted(adapters) == sorted(keys.missing_keys)
    assert all(v.abs().sum() > 0 for k, v in adapters.items() if "lora_a" in k)  # initialised


def test_gather_full_state_dict_single_process_is_a_detached_copy():
    model = tiny_llama()
    gathered = state_dicts.gather_full_state_dict(model, trainable_only=False)
    assert sorted(gathered) == sorted(model.state_dict())
    before = gathered["output.weight"].clone()
    with torch.no_grad():
        model.output.weight.add_(1.0)
    assert torch.equal(gathered["output.weight"], before)
    assert state_dicts.gather_full_state_dict(tiny_lora(), trainable_only=True).keys() == {
        f"layers.{i}.attn.{p}.lora_{ab}.weight"
        for i in (0, 1)
        for p in ("q_proj", "v_proj")
        for ab in "ab"
    }


def test_optimizer_state_round_trip_single_process_resumes_bitwise():
    tokens, labels = tokens_and_labels(2)
    next_tokens, next_labels = tokens_and_labels(3)

    def make(model):
        return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)

    model = tiny_llama()
    optimizer = make(model)
    mean_ce(model, tokens, labels).backward()
    optimizer.step()
    optimizer.zero_grad()
    saved_model = state_dicts.gather_full_state_dict(model, trainable_only=False)
    saved_optim = state_dicts.gather_full_optimizer_state_dict(model, optimizer)
    step_before = saved_optim["state"]["output.weight"]["step"].clone()
    exp_avg_before = saved_optim["state"]["output.weight"]["exp_avg"].clone()
    mean_ce(model, next_tokens, next_labels).backward()
    optimizer.step()
    # The saved copy did not follow the live optimizer.
    assert torch.equal(saved_optim["state"]["output.weight"]["step"], step_before)
    assert torch.equal(saved_optim["state"]["output.weight"]["exp_avg"], exp_avg_before)

    resumed = tiny_llama(seed=9)
    state_dicts.load_full_state_dict(
        resumed, saved_model, device="cpu", strict=True, broadcast_from_rank0=False
    )
    resumed_optimizer = make(resumed)
    state_dicts.load_full_optimizer_state_dict(
        resumed, resumed_optimizer, saved_optim, broadcast_from_rank0=False
    )
    mean_ce(resumed, next_tokens, next_labels).backward()
    resumed_optimizer.step()
    for key, value in model.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    # Loading did not hand the caller's tensors to the optimizer (Adam updates `step` in place).
    assert torch.equal(saved_optim["state"]["output.weight"]["step"], step_before)


def test_clip_grad_norm_single_process_matches_torch():
    tokens, labels = tokens_and_labels(4)
    model, reference = tiny_llama(), tiny_llama()
    mean_ce(model, tokens, labels).backward()
    mean_ce(reference, tokens, labels).backward()
    norm = parallel.clip_grad_norm_(model, 0.1)
    expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.1)
    assert norm.dtype == torch.float32 and norm.dim() == 0
    torch.testing.assert_close(norm, expected)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_activation_checkpointing_keeps_names_and_gradients():
    tokens, labels = tokens_and_labels(5)
    model, reference = tiny_llama(), tiny_llama()
    parallel.apply_activation_checkpointing(model)
    parallel.apply_activation_checkpointing(model)  # idempotent
    assert all(isinstance(layer, CheckpointWrapper) for layer in model.layers)
    assert not any(
        isinstance(layer._checkpoint_wrapped_module, CheckpointWrapper) for layer in model.layers
    )
    assert sorted(model.state_dict()) == sorted(reference.state_dict())
    mean_ce(model, tokens, labels).backward()
    mean_ce(reference, tokens, labels).backward()
    grads = {state_dicts.state_dict_key(n): p.grad for n, p in model.named_parameters()}
    for name, param in reference.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, atol=1e-7, rtol=0)


def test_apply_compile_per_layer_keeps_outputs():
    tokens, _ = tokens_and_labels(6)
    model, reference = tiny_llama(), tiny_llama()
    parallel.apply_compile(model, backend="eager")
    assert all(layer._compiled_call_impl is not None for layer in model.layers)
    assert sorted(model.state_dict()) == sorted(reference.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference(tokens), atol=1e-6, rtol=0)
    torch._dynamo.reset()


def test_peak_memory_gib_cpu_is_the_process_peak_rss():
    gib = metrics.peak_memory_gib("cpu")
    # ru_maxrss (kB on Linux) is another view of the same high-water mark.
    rusage_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30
    assert gib > 0.05
    assert gib == pytest.approx(rusage_gib, rel=0.05)


# --------------------------------------------------------------------------------------------
# Data loader
# --------------------------------------------------------------------------------------------


def _loader(dataset, rank, world_size, *, batch_size=2, shuffle=True, seed=7, drop_last=False):
    return data.build_dataloader(
        dataset,
        batch_size=batch_size,
        collate_fn=lambda samples: list(samples),
        shuffle=shuffle,
        seed=seed,
        rank=rank,
        world_size=world_size,
        drop_last=drop_last,
    )


def _epoch(loader, epoch: int) -> list[list[int]]:
    loader.sampler.set_epoch(epoch)
    return [batch for batch in loader]


def test_dataloader_ranks_see_disjoint_shards_covering_the_dataset():
    dataset = list(range(24))
    shards = [[i for b in _epoch(_loader(dataset, r, 2), 0) for i in b] for r in (0, 1)]
    assert set(shards[0]).isdisjoint(shards[1])
    assert sorted(shards[0] + shards[1]) == dataset
    # Each step's global batch (2 ranks x 2) is one process's batch of 4: same seed, same data.
    single = _epoch(_loader(dataset, 0, 1, batch_size=4), 0)
    per_rank = [_epoch(_loader(dataset, r, 2), 0) for r in (0, 1)]
    for step, batch in enumerate(single):
        assert sorted(per_rank[0][step] + per_rank[1][step]) == sorted(batch)
    # A new epoch is a new order.
    assert _epoch(_loader(dataset, 0, 2), 1) != per_rank[0]


def test_dataloader_uneven_dataset_still_covers_everything():
    dataset = list(range(11))
    shards = [[i for b in _epoch(_loader(dataset, r, 2), 0) for i in b] for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 6  # padded by repeating one sample
    assert set(shards[0]) | set(shards[1]) == set(dataset)


def test_dataloader_resumes_mid_epoch_exactly():
    dataset = list(range(40))
    states = []
    for rank in (0, 1):
        loader = _loader(dataset, rank, 2, batch_size=3)
        full_epoch = _epoch(loader, 1)
        loader.sampler.set_epoch(1)
        iterator = iter(loader)
        seen = [next(iterator) for _ in range(3)]
        state = loader.state_dict()
        assert seen == full_epoch[:3]

        resumed = _loader(dataset, rank, 2, batch_size=3)
        resumed.sampler.set_epoch(1)
        resumed.load_state_dict(state)
        assert list(resumed) == full_epoch[3:]
        # The epoch after the resumed one starts from its beginning again.
        assert _epoch(resumed, 2) == _epoch(_loader(dataset, rank, 2, batch_size=3), 2)
        states.append(state)
    # The position holds no rank identity: rank 0's saved state resumes rank 1 correctly, so
    # the recipe may save the loader state of rank 0 only.
    other = _loader(dataset, 1, 2, batch_size=3)
    other.sampler.set_epoch(1)
    other.load_state_dict(states[0])
    assert list(other) == _epoch(_loader(dataset, 1, 2, batch_size=3), 1)[3:]


def test_dataloader_rejects_bad_rank_and_batch_size():
    with pytest.raises(ValueError, match="rank=2"):
        _loader(list(range(4)), 2, 2)
    with pytest.raises(ValueError, match="batch_size=0"):
        _loader(list(range(4)), 0, 1, batch_size=0)


def _load_worker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fsdp_checks", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_worker_batches_give_the_ranks_different_token_counts():
    """The gradient-parity check is only meaningful when a per-rank mean would be wrong."""
    worker = _load_worker()
    _, labels = worker.make_batch(2)
    counts = [(worker.rank_slice(labels, r, 2) != -100).sum().item() for r in (0, 1)]
    assert counts[0] != counts[1]
