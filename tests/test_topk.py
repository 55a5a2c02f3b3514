"""Sparse (top-k) teacher losses against plain fp64 references written in this file.

A :class:`kdtune.losses.TopKTeacher` is built here from dense teacher logits (top-k of the
tempered log-softmax, the rest mass by logsumexp over the other columns). The references form
the (k+1)-bucket or renormalised distributions directly from probabilities and take fp64
autograd gradients; ``kl_terms`` sums only where both probabilities are > 0 (the documented
rule for infinite terms). Tolerances: fp32 values rtol 1e-5, gradients rtol 1e-5 / atol 1e-7
(gradients are O(1 / tokens)); bf16 students as in tests/test_losses.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from kdtune.losses import (
    ChunkedKDLoss,
    ForwardKLWithChunkedOutputLoss,
    FusedLinearKDLoss,
    TopKTeacher,
    kd_loss,
)

BATCH, TOKENS, VOCAB = 2, 13, 37
VALUE_TOL = {"rtol": 1e-5, "atol": 1e-6}
GRAD_TOL = {"rtol": 1e-5, "atol": 1e-7}
CASES = [("forward_kl", {}), ("reverse_kl", {}), ("jsd", {"beta": 0.3})]


pytestmark = pytest.mark.usefixtures("one_thread_and_restored_torch_globals")


def make_inputs(seed: int = 0, vocab: int = VOCAB, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    teacher = 2 * torch.randn(BATCH, TOKENS, vocab, generator=g)
    student = (teacher + torch.randn(BATCH, TOKENS, vocab, generator=g)).to(dtype)
    labels = torch.randint(0, vocab, (BATCH, TOKENS), generator=g)
    labels[torch.rand(BATCH, TOKENS, generator=g) < 0.3] = -100
    return student, teacher, labels


def topk_teacher(teacher: Tensor, k: int, temperature: float = 1.0) -> TopKTeacher:
    """The cache format from dense logits, computed in fp64 and stored as fp32."""
    log_p = F.log_softmax(teacher.double() / temperature, dim=-1)
    values, ids = log_p.topk(k, dim=-1)
    rest = log_p.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return TopKTeacher(ids, values.float(), rest.float())


# ------------------------------------------------------------------------------------------------
# References


def kl_terms(a: Tensor, b: Tensor) -> Tensor:
    both = (a > 0) & (b > 0)
    safe_a, safe_b = torch.where(both, a, 1.0), torch.where(both, b, 1.0)
    return torch.where(both, safe_a * (safe_a.log() - safe_b.log()), 0.0).sum(-1)


def ref_divergence(name: str, params: dict, p: Tensor, q: Tensor) -> Tensor:
    if name == "forward_kl":
        return kl_terms(p, q)
    if name == "reverse_kl":
        return kl_terms(q, p)
    beta = params["beta"]
    m = beta * p + (1 - beta) * q
    return beta * kl_terms(p, m) + (1 - beta) * kl_terms(q, m)


def ref_distributions(student: Tensor, teacher: TopKTeacher, mode: str, temperature: float):
    """``(P, Q)`` per token in fp64: ``[N, k + 1]`` buckets or ``[N, k]`` renormalised."""
    vocab = student.shape[-1]
    s = student.reshape(-1, vocab) / temperature
    ids = teacher.token_ids.reshape(-1, teacher.token_ids.shape[-1])
    logprobs = teacher.logprobs.double().reshape(ids.shape)
    if mode == "renormalize":
        return F.softmax(logprobs, -1), F.softmax(s.gather(-1, ids), -1)
    q_k = F.softmax(s, -1).gather(-1, ids)
    q = torch.cat([q_k, (1 - q_k.sum(-1, keepdim=True)).clamp(min=0)], -1)
    rest = teacher.rest_logmass.double().reshape(-1, 1).exp()
    return torch.cat([logprobs.exp(), rest], -1), q


def reference(student, teacher, labels, name, params, mode="bucket", temperature=1.0):
    """The mean KD loss (T² scaled) over non-ignored tokens, fp64."""
    p, q = ref_distributions(student.double(), teacher, mode, temperature)
    kept = labels.reshape(-1) != -100
    per = ref_divergence(name, params, p, q) * temperature**2
    return per[kept].sum() / kept.sum().clamp(min=1)


def value_and_grad(fn, student: Tensor):
    leaf = student.detach().clone().requires_grad_(True)
    value = fn(leaf)
    value.backward()
    return value.detach(), leaf.grad


def assert_matches(ours, expected, value_tol=VALUE_TOL, grad_tol=GRAD_TOL):
    torch.testing.assert_close(ours[0].double(), expected[0].double(), **value_tol)
    torch.testing.assert_close(ours[1].double(), expected[1].double(), **grad_tol)


# ------------------------------------------------------------------------------------------------
# Values and gradients


@pytest.mark.parametrize("mode", ["bucket", "renormalize"])
@pytest.mark.parametrize(("name", "params"), CASES)
def test_chunked_matches_reference(name, params, mode):
    student, teacher_logits, labels = make_inputs()
    teacher = topk_teacher(teacher_logits, 5, temperature=2.0)
    loss = ChunkedKDLoss(name, params, 4, temperature=2.0, topk_mode=mode)
    chunks = [5, 0, 8]
    ours = value_and_grad(lambda s: loss(list(s.split(chunks, 1)), teacher, labels), student)
    expected = value_and_grad(
        lambda s: reference(s, teacher, labels, name, params, mode, 2.0), student.double()
    )
    assert_matches(ours, expected)


@pytest.mark.parametrize(("name", "params"), CASES)
def test_k_equal_to_vocab_is_the_dense_loss(name, params):
    student, teacher_logits, labels = make_inputs(seed=1)
    dense = ChunkedKDLoss(name, params, temperature=1.5)
    expected = value_and_grad(lambda s: dense(s, teacher_logits, labels), student)
    teacher = topk_teacher(teacher_logits, VOCAB, temperature=1.5)
    assert torch.isneginf(teacher.rest_logmass).all()
    for mode in ("bucket", "renormalize"):
        sparse = ChunkedKDLoss(name, params, temperature=1.5, topk_mode=mode)
        ours = value_and_grad(lambda s, sparse=sparse: sparse(s, teacher, labels), student)
        assert_matches(ours, expected)


@pytest.mark.parametrize("mode", ["bucket", "renormalize"])
def test_fp64_gradcheck(mode):
    student, teacher_logits, labels = make_inputs(seed=2, vocab=9)
    student = student[:, :4].double().requires_grad_(True)
    labels = labels[:, :4]
    teacher = topk_teacher(teacher_logits[:, :4], 3)
    teacher = TopKTeacher(teacher.token_ids, teacher.logprobs.double(), teacher.rest_logmass)
    for name, params in CASES:
        loss = ChunkedKDLoss(name, params, temperature=0.7, topk_mode=mode)
        assert torch.autograd.gradcheck(lambda s, loss=loss: loss(s, teacher, labels), (student,))


def test_fused_gathers_from_hidden_states_and_matches_chunked():
    """Fused (hidden x weight, KD + CE) equals the chunked loss on the same logits."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(BATCH, TOKENS, 6, generator=g, requires_grad=True)
    weight = torch.randn(VOCAB, 6, generator=g, requires_grad=True)
    _, teacher_logits, labels = make_inputs(seed=3)
    teacher = topk_teacher(teacher_logits, 4)
    for mode in ("bucket", "renormalize"):
        fused = FusedLinearKDLoss("jsd", {"beta": 0.3}, chunk_size=5, topk_mode=mode)
        out = fused(hidden, weight, labels, kd_ratio=0.4, teacher_topk=teacher)
        got = torch.autograd.grad(out.loss, [hidden, weight])
        logits = hidden @ weight.t()
        chunked = ChunkedKDLoss("jsd", {"beta": 0.3}, topk_mode=mode)
        ref = chunked.kd_and_ce(logits, teacher, labels, kd_ratio=0.4)
        ce = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))
        torch.testing.assert_close(ref.ce_loss, ce.detach(), **VALUE_TOL)
        torch.testing.assert_close(ref.kd_loss, chunked(logits, teacher, labels).detach())
        expected = torch.autograd.grad(ref.loss, [hidden, weight])
        torch.testing.assert_close(out.loss, ref.loss, **VALUE_TOL)
        for mine, theirs in zip(got, expected):
            torch.testing.assert_close(mine, theirs, **GRAD_TOL)


def test_bf16_student_against_the_same_values_in_fp64():
    student, teacher_logits, labels = make_inputs(seed=4, dtype=torch.bfloat16)
    teacher = topk_teacher(teacher_logits, 6)
    loss = ForwardKLWithChunkedOutputLoss()
    ours = value_and_grad(lambda s: loss(s, teacher, labels), student)
    expected = value_and_grad(
        lambda s: reference(s, teacher, labels, "forward_kl", {}), student.double()
    )
    assert ours[1].dtype == torch.bfloat16
    assert_matches(ours, expected, {"rtol": 1e-4, "atol": 1e-6}, {"rtol": 2**-7, "atol": 1e-7})


def test_masked_student_columns_and_garbage_at_ignored_rows():
    """``-inf`` student logits follow the dropped-term rule; ignored rows may hold anything."""
    student, teacher_logits, labels = make_inputs(seed=5)
    student[..., :3] = float("-inf")
    teacher = topk_teacher(teacher_logits, 5)
    ignored = labels == -100
    garbage = TopKTeacher(
        teacher.token_ids,
        teacher.logprobs.masked_fill(ignored.unsqueeze(-1), 0.0),
        teacher.rest_logmass.masked_fill(ignored, float("nan")),
    )
    for name, params in CASES:
        loss = ChunkedKDLoss(name, params)
        ours = value_and_grad(lambda s, loss=loss: loss(s, garbage, labels), student)
        expected = value_and_grad(
            lambda s, name=name, params=params: reference(s, teacher, labels, name, params),
            student.double(),
        )
        assert torch.isfinite(ours[1]).all()
        assert_matches(ours, expected)


def test_all_ignored_is_an_exact_connected_zero():
    student, teacher_logits, labels = make_inputs(seed=6)
    teacher = topk_teacher(teacher_logits, 4)
    value, grad = value_and_grad(
        lambda s: kd_loss(s, teacher, torch.full_like(labels, -100)), student
    )
    assert value.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))


def test_unsupported_divergence_and_bad_teacher_are_named():
    student, teacher_logits, labels = make_inputs()
    teacher = topk_teacher(teacher_logits, 4)
    with pytest.raises(ValueError, match=r"ChunkedKDLoss with divergence='total_variation'"):
        ChunkedKDLoss("total_variation")(student, teacher, labels)
    with pytest.raises(ValueError, match="topk_mode"):
        ChunkedKDLoss(topk_mode="top")
    short = TopKTeacher(teacher.token_ids[:, :5], teacher.logprobs[:, :5], teacher.rest_logmass)
    with pytest.raises(ValueError, match=r"TopKTeacher.token_ids has shape"):
        kd_loss(student, short, labels)
    with pytest.raises(ValueError, match="int64"):
        kd_loss(student, teacher._replace(token_ids=teacher.token_ids.int()), labels)
