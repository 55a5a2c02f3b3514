"""Parity with torchtune 0.6.1's chunked losses, the baseline our classes replace.

On the same chunks (finite logits, some ignored labels, even chunks: torchtune splits the labels
with ``labels.chunk``) the gradients with respect to the student are equal. The values: our
forward KL is torchtune's minus the mean teacher entropy over the non-ignored tokens (torchtune
reports the teacher-student cross-entropy), our symmetric KL is torchtune's minus
``sym_kd_ratio`` times that entropy, reverse KL and cross-entropy are equal. The last tests pin
the baseline gaps we fix (NaN or a disconnected 0 for an all-ignored batch, NaN gradients for a
masked teacher column, fp32 intermediates kept for backward).

Tolerances: fp32 values atol 1e-5 (values are O(1)), fp32 gradients rtol 1e-5 / atol 1e-8;
bf16 inputs (both sides compute in fp32 from the same values): values atol 1e-4, gradients
rtol 2**-7 / atol 1e-7 (bf16 rounding).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor
from torchtune import config as tt_config
from torchtune.models.llama3 import llama3
from torchtune.modules import loss as tt_loss

from kdtune.losses import (
    CEWithChunkedOutputLoss,
    ForwardKLWithChunkedOutputLoss,
    ReverseKLWithChunkedOutputLoss,
    SymmetricKLWithChunkedOutputLoss,
)

BATCH, TOKENS, VOCAB, CHUNKS = 3, 48, 123, 8
FP32_GRAD = {"rtol": 1e-5, "atol": 1e-8}
BF16_GRAD = {"rtol": 2**-7, "atol": 1e-7}


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """Tiny tensors: a second intra-op thread only adds synchronisation on a shared machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_inputs(
    dtype: torch.dtype = torch.float32, ignore_index: int = -100, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """Student and teacher logits ``[B, S, V]`` and labels ``[B, S]`` with ~30% ignored."""
    g = torch.Generator().manual_seed(seed)
    teacher = 2 * torch.randn(BATCH, TOKENS, VOCAB, generator=g)
    student = teacher + torch.randn(BATCH, TOKENS, VOCAB, generator=g)
    labels = torch.randint(0, VOCAB, (BATCH, TOKENS), generator=g)
    labels[torch.rand(BATCH, TOKENS, generator=g) < 0.3] = ignore_index
    return student.to(dtype), teacher.to(dtype), labels


def mean_teacher_entropy(teacher: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """``-sum_v p_v log p_v`` averaged over the non-ignored tokens, in fp64."""
    log_p = F.log_softmax(teacher.double(), dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return entropy[labels != ignore_index].mean()


def kd_value_and_grad(loss: Callable, student: Tensor, teacher: Tensor, labels: Tensor):
    """The loss on ``CHUNKS`` even chunks made with ``torch.chunk`` and the student gradient."""
    s = student.detach().clone().requires_grad_(True)
    value = loss(list(s.chunk(CHUNKS, dim=1)), list(teacher.chunk(CHUNKS, dim=1)), labels)
    value.backward()
    return value.detach().double(), s.grad


@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_forward_kl_same_gradient_value_lower_by_teacher_entropy(ignore_index: int) -> None:
    student, teacher, labels = make_inputs(ignore_index=ignore_index)
    theirs = kd_value_and_grad(
        tt_loss.ForwardKLWithChunkedOutputLoss(CHUNKS, ignore_index), student, teacher, labels
    )
    ours = kd_value_and_grad(
        ForwardKLWithChunkedOutputLoss(CHUNKS, ignore_index), student, teacher, labels
    )
    torch.testing.assert_close(ours[1], theirs[1], **FP32_GRAD)
    entropy = mean_teacher_entropy(teacher, labels, ignore_index)
    torch.testing.assert_close(theirs[0] - ours[0], entropy, rtol=0, atol=1e-5)
    assert ours[0] > 0


def test_forward_kl_bf16_parity() -> None:
    student, teacher, labels = make_inputs(dtype=torch.bfloat16)
    theirs = kd_value_and_grad(
        tt_loss.ForwardKLWithChunkedOutputLoss(CHUNKS), student, teacher, labels
    )
    ours = kd_value_and_grad(ForwardKLWithChunkedOutputLoss(CHUNKS), student, teacher, labels)
    assert ours[1].dtype == theirs[1].dtype == torch.bfloat16
    torch.testing.assert_close(ours[1].float(), theirs[1].float(), **BF16_GRAD)
    entropy = mean_teacher_entropy(teacher, labels)
    torch.testing.assert_close(theirs[0] - ours[0], entropy, rtol=0, atol=1e-4)


def test_reverse_kl_equal_value_and_gradient() -> None:
    student, teacher, labels = make_inputs()
    theirs = kd_value_and_grad(
        tt_loss.ReverseKLWithChunkedOutputLoss(CHUNKS), student, teacher, labels
    )
    ours = kd_value_and_grad(ReverseKLWithChunkedOutputLoss(CHUNKS), student, teacher, labels)
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(ours[1], theirs[1], **FP32_GRAD)


def test_symmetric_kl_value_lower_by_ratio_times_teacher_entropy() -> None:
    student, teacher, labels = make_inputs()
    theirs = kd_value_and_grad(
        tt_loss.SymmetricKLWithChunkedOutputLoss(CHUNKS, sym_kd_ratio=0.3),
        student,
        teacher,
        labels,
    )
    ours = kd_value_and_grad(
        SymmetricKLWithChunkedOutputLoss(CHUNKS, sym_kd_ratio=0.3), student, teacher, labels
    )
    torch.testing.assert_close(ours[1], theirs[1], **FP32_GRAD)
    entropy = mean_teacher_entropy(teacher, labels)
    torch.testing.assert_close(theirs[0] - ours[0], 0.3 * entropy, rtol=0, atol=1e-5)


def test_cross_entropy_equal_value_and_gradient() -> None:
    student, _, labels = make_inputs()
    results = []
    for loss in (tt_loss.CEWithChunkedOutputLoss(CHUNKS), CEWithChunkedOutputLoss(CHUNKS)):
        logits = student.clone().requires_grad_(True)
        value = loss(list(logits.chunk(CHUNKS, dim=1)), labels)
        value.backward()
        results.append((value.detach(), logits.grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], **FP32_GRAD)


def test_drop_in_for_a_torchtune_config_and_model_in_chunked_mode() -> None:
    """``kd_loss._component_`` pointed at our class, fed a torchtune model's chunked output.

    A 10-token batch with 8 output chunks: torchtune's ``torch.chunk`` gives 5 chunks.
    Gradients of the student's parameters equal those from torchtune's loss.
    """
    torch.manual_seed(0)
    student = llama3(
        vocab_size=64, num_layers=1, num_heads=2, num_kv_heads=1, embed_dim=16, max_seq_len=16
    )
    teacher = llama3(
        vocab_size=64, num_layers=2, num_heads=2, num_kv_heads=1, embed_dim=32, max_seq_len=16
    )
    for model in (student, teacher):
        model.set_num_output_chunks(CHUNKS)
    tokens = torch.randint(0, 64, (2, 10))
    labels = torch.randint(0, 64, (2, 10))
    labels[0, :3] = -100

    ours = tt_config.instantiate(
        OmegaConf.create(
            {
                "_component_": "kdtune.losses.ForwardKLWithChunkedOutputLoss",
                "num_output_chunks": CHUNKS,
                "ignore_index": -100,
            }
        )
    )
    # torchtune's KD recipe checks this class name to switch the models to chunked output.
    assert CEWithChunkedOutputLoss.__name__ == tt_loss.CEWithChunkedOutputLoss.__name__

    with torch.no_grad():
        teacher_chunks = teacher(tokens)
    grads = []
    for loss in (tt_loss.ForwardKLWithChunkedOutputLoss(CHUNKS), ours):
        student.zero_grad()
        student_chunks = student(tokens)
        assert len(student_chunks) == 5
        loss(student_chunks, teacher_chunks, labels).backward()
        grads.append([p.grad.clone() for p in student.parameters()])
    for theirs, mine in zip(*grads):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# Baseline gaps


def test_all_ignored_batch_gives_a_connected_zero_where_torchtune_does_not() -> None:
    student, teacher, labels = make_inputs()
    labels = torch.full_like(labels, -100)
    s = list(student.clone().requires_grad_(True).chunk(CHUNKS, dim=1))
    t = list(teacher.chunk(CHUNKS, dim=1))

    assert torch.isnan(tt_loss.ReverseKLWithChunkedOutputLoss(CHUNKS)(s, t, labels))
    assert torch.isnan(tt_loss.CEWithChunkedOutputLoss(CHUNKS)(s, labels))
    disconnected = tt_loss.ForwardKLWithChunkedOutputLoss(CHUNKS)(s, t, labels)
    assert disconnected.item() == 0.0 and disconnected.grad_fn is None

    for value in (
        ForwardKLWithChunkedOutputLoss(CHUNKS)(s, t, labels),
        ReverseKLWithChunkedOutputLoss(CHUNKS)(s, t, labels),
        CEWithChunkedOutputLoss(CHUNKS)(s, labels),
    ):
        assert value.item() == 0.0 and value.grad_fn is not None


def test_masked_teacher_column_in_reverse_kl_has_no_nan_gradient() -> None:
    student, teacher, labels = make_inputs()
    teacher[..., 5] = float("-inf")  # e.g. a token the teacher's vocabulary never emits
    theirs = kd_value_and_grad(
        tt_loss.ReverseKLWithChunkedOutputLoss(CHUNKS), student, teacher, labels
    )
    ours = kd_value_and_grad(ReverseKLWithChunkedOutputLoss(CHUNKS), student, teacher, labels)
    assert torch.isnan(theirs[1]).any()
    assert torch.isfinite(ours[1]).all()
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=1e-5)  # same value rule


def saved_bytes_per_logit(loss: Callable, student: Tensor, teacher: Tensor, labels: Tensor):
    """Bytes that autograd keeps for backward per student logit (vocabulary-sized tensors)."""
    saved: list[weakref.ref] = []

    def pack(tensor: Tensor) -> Tensor:
        saved.append(weakref.ref(tensor))
        return tensor

    s = student.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        value = loss(list(s.chunk(CHUNKS, dim=1)), list(teacher.chunk(CHUNKS, dim=1)), labels)
    alive = {
        id(t): t for ref in saved if (t := ref()) is not None and t.dim() and t.shape[-1] == VOCAB
    }
    kept = sum(t.numel() * t.element_size() for t in alive.values())
    del value
    return kept / student.numel()


def test_keeps_one_bf16_gradient_where_torchtune_keeps_fp32_intermediates() -> None:
    student, teacher, labels = make_inputs(dtype=torch.bfloat16)
    ours = saved_bytes_per_logit(ForwardKLWithChunkedOutputLoss(CHUNKS), student, teacher, labels)
    theirs = saved_bytes_per_logit(
        tt_loss.ForwardKLWithChunkedOutputLoss(CHUNKS), student, teacher, labels
    )
    assert ours == 2.0  # one bf16 gradient
    assert theirs >= 8.0  # at least two fp32 [N, V] tensors per chunk
