"""Every head's chunks as 2-D matmuls: the student's too, frozen (LoRA, tied) or trainable.

``chunked_logits`` projects each ``[B, S_i, D]`` chunk of the final hidden states as a
``[B * S_i, D]`` matrix. The reference here is the plain 3-D ``F.linear`` of each chunk of the
same hidden states (what torchtune's ``chunked_output`` computes), written in the test: the
logits and the gradient w.r.t. the hidden states must agree, in fp32 and bf16, at odd shapes
(uneven chunks of an odd sequence, an odd vocabulary). A LoRA recipe step (``ChunkedLossStep``)
gives the loss and adapter gradients of the student's own 3-D chunked forward (main's path).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchtune.models.llama3 import lora_llama3
from torchtune.models.llama3_2 import llama3_2, lora_llama3_2
from torchtune.modules.peft import get_adapter_params, set_trainable_params

from kdtune.losses import CEWithChunkedOutputLoss, ForwardKLWithChunkedOutputLoss
from kdtune.training.lm_head import chunked_logits, last_position_logits
from kdtune.training.steps import ChunkedLossStep

VOCAB = 123  # odd: no row block divides it
TINY = dict(
    vocab_size=VOCAB,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    embed_dim=32,
    max_seq_len=64,
    intermediate_dim=64,
)
LORA = dict(lora_attn_modules=["q_proj", "v_proj"], lora_rank=4, lora_alpha=8)
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(kind: str) -> nn.Module:
    """``frozen_tied``: LoRA student with a tied (frozen) output; ``frozen``: LoRA student with
    an untied frozen output; ``trainable``: full-parameter student."""
    torch.manual_seed(0)
    if kind == "frozen_tied":
        model = lora_llama3_2(**LORA, tie_word_embeddings=True, **TINY)
    elif kind == "frozen":
        model = lora_llama3(**LORA, **TINY)
    elif kind == "trainable":
        return llama3_2(**TINY, tie_word_embeddings=True)
    else:
        raise AssertionError(kind)
    set_trainable_params(model, get_adapter_params(model))
    return model


def _capture_hidden(model: nn.Module) -> list[Tensor]:
    """The final norm's output ``[B, S, D]`` of every forward, kept for its gradient."""
    seen: list[Tensor] = []

    def hook(module, args, output):
        output.retain_grad()
        seen.append(output)

    model.norm.register_forward_hook(hook)
    return seen


def _reference_chunks(hidden: Tensor, weight: Tensor, num_chunks: int) -> list[Tensor]:
    """The plain 3-D projection of each chunk: ``F.linear([B, S_i, D], [V, D])``."""
    return [F.linear(chunk, weight) for chunk in hidden.chunk(num_chunks, dim=1)]


@pytest.mark.parametrize("kind", ["frozen_tied", "frozen", "trainable"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("batch", "seq", "num_chunks"), [(3, 47, 5), (1, 9, 8), (2, 16, 3)])
def test_chunked_logits_and_hidden_gradient_match_the_3d_projection(
    kind, dtype, batch, seq, num_chunks
):
    model = build(kind).to(dtype)
    model.set_num_output_chunks(num_chunks)
    hidden_seen = _capture_hidden(model)
    tokens = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))

    chunks = chunked_logits(model, tokens)
    (hidden,) = hidden_seen
    weight = model.output.tied_module.weight if kind != "frozen" else model.output.weight
    expected = _reference_chunks(hidden.detach().requires_grad_(), weight.detach(), num_chunks)
    assert [c.shape for c in chunks] == [c.shape for c in expected]
    for ours, theirs in zip(chunks, expected, strict=True):
        assert ours.dtype == dtype
        torch.testing.assert_close(ours, theirs.detach(), **TOLERANCE[dtype])

    # d(sum_i <G_i, logits_i>)/dh: ours through the reshape, the reference through 3-D F.linear
    g = torch.Generator().manual_seed(2)
    grads_out = [torch.randn(c.shape, generator=g).to(dtype) for c in chunks]
    torch.autograd.backward(chunks, grads_out)
    reference_hidden = hidden.detach().float().requires_grad_()
    reference = _reference_chunks(reference_hidden, weight.detach().float(), num_chunks)
    torch.autograd.backward(reference, [x.float() for x in grads_out])
    assert hidden.grad is not None and hidden.grad.shape == (batch, seq, TINY["embed_dim"])
    torch.testing.assert_close(hidden.grad.float(), reference_hidden.grad, **TOLERANCE[dtype])


@pytest.mark.parametrize("kind", ["frozen_tied", "frozen"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_recipe_step_matches_the_student_own_chunked_forward(kind, dtype):
    """The loss and adapter gradients of ``ChunkedLossStep`` equal those of the student's own
    3-D chunked head (``student(tokens)``, main's path) with the same teacher chunks."""
    num_chunks = 4
    student = build(kind).to(dtype)
    torch.manual_seed(3)
    teacher = llama3_2(**TINY, tie_word_embeddings=True).to(dtype)
    for model in (student, teacher):
        model.set_num_output_chunks(num_chunks)
    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, VOCAB, (3, 21), generator=g)
    labels = torch.randint(0, VOCAB, (3, 21), generator=g)
    labels[0, :5] = -100
    num_tokens = (labels != -100).sum()
    kd_loss = ForwardKLWithChunkedOutputLoss(num_output_chunks=num_chunks)
    ce_loss = CEWithChunkedOutputLoss(num_output_chunks=num_chunks)

    out = ChunkedLossStep(ce_loss, kd_loss, kd_ratio=0.5)(
        student, teacher, tokens, labels, num_tokens
    )
    out.loss.backward()
    ours = {n: p.grad.clone() for n, p in student.named_parameters() if p.requires_grad}
    student.zero_grad(set_to_none=True)

    with torch.no_grad():
        teacher_chunks = teacher(tokens)
    student_chunks = student(tokens)  # torchtune's chunked_output: 3-D F.linear per chunk
    kd = kd_loss(student_chunks, teacher_chunks, labels, num_tokens=num_tokens)
    ce = ce_loss(student_chunks, labels, num_tokens=num_tokens)
    reference = 0.5 * ce + 0.5 * kd
    reference.backward()
    theirs = {n: p.grad for n, p in student.named_parameters() if p.requires_grad}

    torch.testing.assert_close(out.loss, reference, **TOLERANCE[dtype])
    assert ours.keys() == theirs.keys() and ours
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], **TOLERANCE[dtype], msg=name)


@pytest.mark.parametrize("num_chunks", [0, 3])
def test_last_position_logits_are_the_model_last_logits(num_chunks):
    """Decoding projects only the last position, whatever the chunked-output setting."""
    model = build("frozen_tied")
    model.set_num_output_chunks(num_chunks)
    tokens = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = last_position_logits(model, tokens)
        model.set_num_output_chunks(0)
        expected = model(tokens)[:, -1]
    assert logits.shape == (2, VOCAB)
    torch.testing.assert_close(logits.float(), expected, rtol=1e-5, atol=1e-5)
    assert "unembed" not in vars(model)
