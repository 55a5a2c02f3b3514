"""Hidden states and output projection of torchtune decoders, plain and FSDP2-sharded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchtune.models.llama3 import llama3, lora_llama3
from torchtune.models.llama3_2 import llama3_2
from torchtune.modules.peft import get_adapter_params, set_trainable_params

from kdtune.losses.fused import FusedLinearKDLoss
from kdtune.training.lm_head import (
    chunked_logits,
    forward_hidden,
    output_projection,
    release_output_projection,
)

VOCAB = 128
TINY = dict(
    vocab_size=VOCAB,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    embed_dim=32,
    max_seq_len=32,
    intermediate_dim=64,
)


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """Tiny models: a second OpenMP thread costs more than it saves on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "plain":
        return llama3(**TINY)
    if kind == "tied":
        return llama3_2(**TINY, tie_word_embeddings=True)
    if kind == "lora":
        model = lora_llama3(
            lora_attn_modules=["q_proj", "v_proj"], lora_rank=4, lora_alpha=8, **TINY
        )
        set_trainable_params(model, get_adapter_params(model))
        return model
    raise AssertionError(kind)


def batch(seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (2, 10), generator=g)
    labels = torch.randint(0, VOCAB, (2, 10), generator=g)
    labels[0, :3] = -100
    return tokens, labels


@pytest.mark.parametrize("kind", ["plain", "tied"])
def test_projecting_the_hidden_states_gives_the_model_output(kind):
    model = build(kind)
    tokens, _ = batch()
    hidden = forward_hidden(model, tokens)
    assert hidden.shape == (2, 10, 32)
    weight, bias = output_projection(model)
    torch.testing.assert_close(F.linear(hidden, weight, bias).float(), model(tokens))


def test_chunked_output_setting_does_not_matter():
    model = build("plain")
    tokens, _ = batch()
    expected = forward_hidden(model, tokens)
    model.set_num_output_chunks(4)
    torch.testing.assert_close(forward_hidden(model, tokens), expected)
    assert isinstance(model(tokens), list)  # the model itself still returns chunks


def test_intermediate_hidden_states_are_dropped():
    model = build("plain")
    tokens, _ = batch()
    expected = forward_hidden(model, tokens)
    model.output_hidden_states = [0]
    torch.testing.assert_close(forward_hidden(model, tokens), expected)


def test_forward_kwargs_are_passed_on():
    model = build("plain")
    tokens, _ = batch()
    # Each token attends only to itself: a different result than the default causal mask.
    mask = torch.eye(10, dtype=torch.bool).expand(2, 10, 10)
    hidden = forward_hidden(model, tokens, mask=mask)
    torch.testing.assert_close(model.output(hidden).float(), model(tokens, mask=mask))
    assert not torch.allclose(hidden, forward_hidden(model, tokens))


def test_unembed_is_restored_even_when_forward_raises():
    model = build("plain")
    too_long = torch.zeros(1, TINY["max_seq_len"] + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="seq_len"):
        forward_hidden(model, too_long)
    assert "unembed" not in vars(model)
    assert model(batch()[0]).shape == (2, 10, VOCAB)


@pytest.mark.parametrize("kind", ["plain", "tied"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_logits_are_the_model_chunks(kind, dtype):
    """The teacher's chunks through 2-D matmuls: the model's own chunked output (3 uneven chunks
    of a 10-token batch of 2, so each chunk is a non-contiguous [2, S_i, D] slice)."""
    model = build(kind).to(dtype)
    model.set_num_output_chunks(3)
    tokens, _ = batch()
    mask = torch.tril(torch.ones(10, 10, dtype=torch.bool)).expand(2, 10, 10)
    with torch.no_grad():
        expected = model(tokens, mask=mask)
        chunks = chunked_logits(model, tokens, mask=mask)
    assert (
        [c.shape for c in chunks]
        == [c.shape for c in expected]
        == [(2, 4, VOCAB)] * 2 + [(2, 2, VOCAB)]
    )
    for ours, theirs in zip(chunks, expected, strict=True):
        assert ours.dtype == theirs.dtype == dtype
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0 if dtype == torch.float32 else 2e-2)
    assert "chunked_output" not in vars(model)


def test_chunked_output_is_restored_even_when_forward_raises():
    model = build("plain")
    model.set_num_output_chunks(2)
    with pytest.raises(ValueError, match="seq_len"):
        chunked_logits(model, torch.zeros(1, TINY["max_seq_len"] + 1, dtype=torch.long))
    assert "chunked_output" not in vars(model)


def test_output_projection_returns_the_parameters_themselves():
    plain, tied = build("plain"), build("tied")
    weight, bias = output_projection(plain)
    assert weight is plain.output.weight and bias is None
    weight, bias = output_projection(tied)
    assert weight is tied.tok_embeddings.weight and bias is None
    release_output_projection(plain)  # no-op without FSDP


def test_lora_output_layer_is_rejected_with_the_fix():
    model = lora_llama3(
        lora_attn_modules=["q_proj"], apply_lora_to_output=True, lora_rank=4, lora_alpha=8, **TINY
    )
    with pytest.raises(ValueError, match="apply_lora_to_output=False"):
        output_projection(model)


def test_non_decoder_is_rejected():
    with pytest.raises(ValueError, match="TransformerDecoder"):
        forward_hidden(nn.Linear(2, 2), torch.zeros(1, 2))


def reference_loss(logits: Tensor, teacher_logits: Tensor, labels: Tensor) -> Tensor:
    """0.5 forward KL + 0.5 CE from full logits, written out independently of kdtune."""
    keep = (labels != -100).reshape(-1)
    log_q = F.log_softmax(logits.reshape(-1, VOCAB), dim=-1)
    log_p = F.log_softmax(teacher_logits.reshape(-1, VOCAB), dim=-1)
    kd = ((log_p.exp() * (log_p - log_q)).sum(-1) * keep).sum() / keep.sum()
    ce = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100)
    return 0.5 * kd + 0.5 * ce


@pytest.mark.parametrize("kind", ["plain", "tied", "lora"])
def test_fused_step_gives_the_full_logits_gradient_of_every_parameter(kind):
    student, teacher = build(kind), build("plain")
    reference_student = build(kind)
    tokens, labels = batch(1)

    with torch.no_grad():
        teacher_hidden = forward_hidden(teacher, tokens)
    weight, bias = output_projection(student)
    out = FusedLinearKDLoss(chunk_size=7)(
        forward_hidden(student, tokens),
        weight,
        labels,
        kd_ratio=0.5,
        teacher_hidden=teacher_hidden,
        teacher_weight=output_projection(teacher)[0],
        student_bias=bias,
    )
    out.loss.backward()

    with torch.no_grad():
        teacher_logits = teacher(tokens)
    expected = reference_loss(reference_student(tokens), teacher_logits, labels)
    expected.backward()
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    for (name, param), reference in zip(
        student.named_parameters(), reference_student.parameters(), strict=True
    ):
        if reference.grad is None:
            assert param.grad is None, name
        else:
            torch.testing.assert_close(param.grad, reference.grad, rtol=1e-5, atol=1e-6, msg=name)
    if kind == "lora":
        assert student.output.weight.grad is None  # frozen: no weight gradient at all
        assert any(p.grad is not None for n, p in student.named_parameters() if "lora" in n)


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_two_processes_match_the_unsharded_model(tmp_path: Path, launch):
    """2 gloo processes on CPU: loss and every gathered gradient equal the unsharded model's."""
    worker = Path(__file__).parent / "dist_workers" / "lm_head.py"
    result = tmp_path / "result.json"
    launch.torchrun(worker, "--out", str(result), cwd=Path(__file__).parents[1])
    layouts = json.loads(result.read_text())["layouts"]
    assert set(layouts) == {
        "torchtune_shard_model",
        "root_unsharded_after_forward",
        "output_in_own_group",
        "tied_embeddings",
    }
    for name, per_rank in layouts.items():
        for rank, numbers in enumerate(per_rank):
            where = f"{name} rank {rank}"
            assert numbers["loss_diff"] < 1e-5, where
            assert numbers["max_grad_diff"] < 1e-5 * max(1.0, numbers["max_ref_grad"]), where
            assert numbers["params_without_grad"] == [], where
            assert numbers["teacher_resharded"], where
            # Both branches of output_projection ran: unsharding a shard, and using the
            # parameter FSDP left unsharded after forward.
            expected_sharded = name != "root_unsharded_after_forward"
            assert numbers["sharded_after_forward"] == expected_sharded, where
