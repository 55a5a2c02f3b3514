"""Tests of the chunked loss family (``kdtune.losses.chunked``) against references in this file.

Every loss is compared with a plain, unchunked reference computed in fp64 from the same input
values (direct formulas, and ``torch.nn.functional.kl_div`` / ``cross_entropy`` where those
apply): values and gradients with respect to both logit sets.

Tolerances:
- fp64 inputs: ``torch.autograd.gradcheck`` (finite differences, its default tolerances;
  the full Jacobian at temperature 1, fast mode for the other temperatures).
- fp32 inputs: value rtol 1e-5 / atol 1e-6; gradients rtol 1e-5 / atol 1e-8 (the gradients
  are O(1 / tokens) per element, so this atol is still ~1e-5 relative).
- bf16 inputs: the reference sees the same bf16 values upcast to fp64. The value is computed
  in fp32 from exact inputs, so rtol 1e-4; gradients come back in bf16 (8-bit mantissa, rounded
  once by the cast and once by the 1/count scaling): rtol 2**-7, atol 1e-7.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from kdtune.losses import (
    CEWithChunkedOutputLoss,
    ChunkedKDLoss,
    ForwardKLWithChunkedOutputLoss,
    JSDWithChunkedOutputLoss,
    ReverseKLWithChunkedOutputLoss,
    SkewForwardKLWithChunkedOutputLoss,
    SkewReverseKLWithChunkedOutputLoss,
    SymmetricKLWithChunkedOutputLoss,
    TVDWithChunkedOutputLoss,
    ce_loss,
    forward_kl_loss,
    jsd_loss,
    kd_loss,
    reverse_kl_loss,
    skew_forward_kl_loss,
    skew_reverse_kl_loss,
    symmetric_kl_loss,
    tvd_loss,
)

BATCH, TOKENS, VOCAB = 3, 47, 123
UNEVEN = [10, 0, 13, 24]  # sums to TOKENS; includes an empty chunk
FP32_VALUE = {"rtol": 1e-5, "atol": 1e-6}
FP32_GRAD = {"rtol": 1e-5, "atol": 1e-8}
BF16_VALUE = {"rtol": 1e-4, "atol": 1e-6}
BF16_GRAD = {"rtol": 2**-7, "atol": 1e-7}


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """These tensors are tiny: a second intra-op thread only adds synchronisation, which costs
    milliseconds per op when the 2-core machine is shared (measured: 84 s -> 16 s here)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ------------------------------------------------------------------------------------------------
# References: per-token divergences on fp64 logits [N, V] -> [N]


def ref_forward_kl(student: Tensor, teacher: Tensor) -> Tensor:
    """KL(p || q) with ``F.kl_div`` (finite logits only)."""
    log_q, log_p = F.log_softmax(student, -1), F.log_softmax(teacher, -1)
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)


def ref_reverse_kl(student: Tensor, teacher: Tensor) -> Tensor:
    """KL(q || p) with ``F.kl_div`` (finite logits only)."""
    log_q, log_p = F.log_softmax(student, -1), F.log_softmax(teacher, -1)
    return F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)


def kl_terms(a: Tensor, b: Tensor) -> Tensor:
    """``sum_v a_v log(a_v / b_v)`` over probabilities ``[N, V]``, summing only where both > 0.

    Terms with ``a_v = 0`` are 0 (0 log 0); terms with ``a_v > 0 = b_v`` are infinite and are
    dropped (the rule documented in ``kdtune.losses.divergences``). Elements are selected before
    any log is taken, so the gradient is NaN-free.
    """
    both = (a > 0) & (b > 0)
    rows = both.nonzero()[:, 0]
    a_kept, b_kept = a[both], b[both]
    terms = a_kept * (a_kept.log() - b_kept.log())
    return torch.zeros(a.shape[0], dtype=a.dtype).index_add(0, rows, terms)


def _probs(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    return F.softmax(student, -1), F.softmax(teacher, -1)


def ref_forward_kl_direct(student: Tensor, teacher: Tensor) -> Tensor:
    q, p = _probs(student, teacher)
    return kl_terms(p, q)


def ref_reverse_kl_direct(student: Tensor, teacher: Tensor) -> Tensor:
    q, p = _probs(student, teacher)
    return kl_terms(q, p)


def ref_symmetric_kl(student: Tensor, teacher: Tensor, ratio: float, direct: bool) -> Tensor:
    forward = ref_forward_kl_direct if direct else ref_forward_kl
    reverse = ref_reverse_kl_direct if direct else ref_reverse_kl
    return ratio * forward(student, teacher) + (1 - ratio) * reverse(student, teacher)


def ref_jsd(student: Tensor, teacher: Tensor, beta: float) -> Tensor:
    q, p = _probs(student, teacher)
    m = beta * p + (1 - beta) * q
    return beta * kl_terms(p, m) + (1 - beta) * kl_terms(q, m)


def ref_skew_forward_kl(student: Tensor, teacher: Tensor, alpha: float) -> Tensor:
    q, p = _probs(student, teacher)
    return kl_terms(p, alpha * p + (1 - alpha) * q)


def ref_skew_reverse_kl(student: Tensor, teacher: Tensor, alpha: float) -> Tensor:
    q, p = _probs(student, teacher)
    return kl_terms(q, alpha * q + (1 - alpha) * p)


def ref_tvd(student: Tensor, teacher: Tensor) -> Tensor:
    q, p = _probs(student, teacher)
    return 0.5 * (p - q).abs().sum(-1)


# name -> (class, constructor kwargs, reference for finite logits, reference allowing -inf)
CASES: dict[str, tuple[type, dict, Callable, Callable]] = {
    "forward_kl": (ForwardKLWithChunkedOutputLoss, {}, ref_forward_kl, ref_forward_kl_direct),
    "reverse_kl": (ReverseKLWithChunkedOutputLoss, {}, ref_reverse_kl, ref_reverse_kl_direct),
    "symmetric_kl": (
        SymmetricKLWithChunkedOutputLoss,
        {"sym_kd_ratio": 0.3},
        partial(ref_symmetric_kl, ratio=0.3, direct=False),
        partial(ref_symmetric_kl, ratio=0.3, direct=True),
    ),
    "jsd": (
        JSDWithChunkedOutputLoss,
        {"beta": 0.3},
        partial(ref_jsd, beta=0.3),
        partial(ref_jsd, beta=0.3),
    ),
    "skew_forward_kl": (
        SkewForwardKLWithChunkedOutputLoss,
        {"alpha": 0.2},
        partial(ref_skew_forward_kl, alpha=0.2),
        partial(ref_skew_forward_kl, alpha=0.2),
    ),
    "skew_reverse_kl": (
        SkewReverseKLWithChunkedOutputLoss,
        {"alpha": 0.2},
        partial(ref_skew_reverse_kl, alpha=0.2),
        partial(ref_skew_reverse_kl, alpha=0.2),
    ),
    "total_variation": (TVDWithChunkedOutputLoss, {}, ref_tvd, ref_tvd),
}
NAMES = list(CASES)


def reference_loss(
    per_token: Callable[[Tensor, Tensor], Tensor],
    student: Tensor,
    teacher: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    temperature_squared: bool = True,
    reduction: str = "mean",
    num_tokens: int | None = None,
) -> Tensor:
    """Unchunked loss in fp64: ``[B, S, V]`` logits, ``[B, S]`` labels -> scalar."""
    vocab = student.shape[-1]
    s = student.double().reshape(-1, vocab) / temperature
    t = teacher.double().reshape(-1, vocab) / temperature
    per = per_token(s, t)
    if temperature_squared:
        per = per * temperature**2
    kept = labels.reshape(-1) != ignore_index
    total = per[kept].sum()
    if reduction == "sum":
        return total
    count = int(kept.sum()) if num_tokens is None else num_tokens
    return total / max(count, 1)


def ref_cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Per-token cross-entropy sum in fp64 with ``F.cross_entropy``."""
    vocab = logits.shape[-1]
    return F.cross_entropy(
        logits.double().reshape(-1, vocab),
        labels.reshape(-1),
        ignore_index=ignore_index,
        reduction="sum",
    )


# ------------------------------------------------------------------------------------------------
# Inputs and runners


def make_inputs(
    *,
    batch: int = BATCH,
    tokens: int = TOKENS,
    vocab: int = VOCAB,
    teacher_vocab: int | None = None,
    dtype: torch.dtype = torch.float32,
    ignore_index: int = -100,
    ignored_fraction: float = 0.3,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Student ``[B, S, V]``, teacher ``[B, S, V_t]`` logits and labels ``[B, S]``."""
    g = torch.Generator().manual_seed(seed)
    teacher = 2 * torch.randn(batch, tokens, teacher_vocab or vocab, generator=g)
    # The student is the teacher plus noise on the shared columns: a realistic, moderate gap.
    student = torch.randn(batch, tokens, vocab, generator=g)
    shared = min(vocab, teacher.shape[-1])
    student[..., :shared] += teacher[..., :shared]
    labels = torch.randint(0, vocab, (batch, tokens), generator=g)
    labels[torch.rand(batch, tokens, generator=g) < ignored_fraction] = ignore_index
    return student.to(dtype), teacher.to(dtype), labels


def split(x: Tensor, sizes: list[int] = UNEVEN) -> list[Tensor]:
    return list(torch.split(x, sizes, dim=1))


def value_and_grads(
    fn: Callable[[Tensor, Tensor], Tensor],
    student: Tensor,
    teacher: Tensor,
    teacher_requires_grad: bool = True,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``fn(student, teacher)`` on fresh leaves, and the leaves' gradients."""
    s = student.detach().clone().requires_grad_(True)
    t = teacher.detach().clone().requires_grad_(teacher_requires_grad)
    value = fn(s, t)
    value.backward()
    return value.detach(), s.grad, t.grad


def chunked(loss: Callable, labels: Tensor, sizes: list[int] = UNEVEN, **kwargs) -> Callable:
    return lambda s, t: loss(split(s, sizes), split(t, sizes), labels, **kwargs)


def assert_close_all(ours: tuple, ref: tuple, value_tol: dict, grad_tol: dict) -> None:
    torch.testing.assert_close(ours[0].double(), ref[0].double(), **value_tol)
    for mine, theirs in zip(ours[1:], ref[1:]):
        assert mine is not None and theirs is not None
        torch.testing.assert_close(mine.double(), theirs.double(), **grad_tol)


# ------------------------------------------------------------------------------------------------
# Values and gradients against the references


@pytest.mark.parametrize("ignore_index", [-100, 0, 7])
@pytest.mark.parametrize("name", NAMES)
def test_fp32_matches_reference(name: str, ignore_index: int) -> None:
    cls, kwargs, ref, _ = CASES[name]
    student, teacher, labels = make_inputs(ignore_index=ignore_index)
    loss = cls(ignore_index=ignore_index, **kwargs)
    ours = value_and_grads(chunked(loss, labels), student, teacher)
    expected = value_and_grads(
        lambda s, t: reference_loss(ref, s, t, labels, ignore_index=ignore_index),
        student.double(),
        teacher.double(),
    )
    assert ours[0].dtype == torch.float32
    assert_close_all(ours, expected, FP32_VALUE, FP32_GRAD)


@pytest.mark.parametrize(("temperature", "squared"), [(1.0, True), (0.5, True), (2.0, False)])
@pytest.mark.parametrize("name", NAMES)
def test_fp64_gradcheck(name: str, temperature: float, squared: bool) -> None:
    cls, kwargs, _, _ = CASES[name]
    student, teacher, labels = make_inputs(batch=2, tokens=5, vocab=7, dtype=torch.float64)
    labels[0, 1] = -100
    loss = cls(temperature=temperature, temperature_squared=squared, **kwargs)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    fn = chunked(loss, labels, [2, 0, 3])
    # The full Jacobian at T=1; the temperature variants check one random projection of it
    # (fast mode) to keep the file quick.
    assert torch.autograd.gradcheck(fn, (student, teacher), fast_mode=temperature != 1.0)


@pytest.mark.parametrize("name", NAMES)
def test_bf16_matches_reference_on_the_same_values(name: str) -> None:
    cls, kwargs, ref, _ = CASES[name]
    student, teacher, labels = make_inputs(dtype=torch.bfloat16)
    ours = value_and_grads(chunked(cls(**kwargs), labels), student, teacher)
    expected = value_and_grads(
        lambda s, t: reference_loss(ref, s, t, labels), student.double(), teacher.double()
    )
    assert ours[0].dtype == torch.float32
    assert ours[1].dtype == torch.bfloat16 and ours[2].dtype == torch.bfloat16
    assert_close_all(ours, expected, BF16_VALUE, BF16_GRAD)


@pytest.mark.parametrize(("temperature", "squared"), [(2.0, True), (2.0, False), (0.5, True)])
@pytest.mark.parametrize("name", NAMES)
def test_temperature(name: str, temperature: float, squared: bool) -> None:
    cls, kwargs, ref, _ = CASES[name]
    student, teacher, labels = make_inputs()
    loss = cls(temperature=temperature, temperature_squared=squared, **kwargs)
    ours = value_and_grads(chunked(loss, labels), student, teacher)
    expected = value_and_grads(
        lambda s, t: reference_loss(
            ref, s, t, labels, temperature=temperature, temperature_squared=squared
        ),
        student.double(),
        teacher.double(),
    )
    assert_close_all(ours, expected, FP32_VALUE, FP32_GRAD)


def test_temperature_squared_scales_by_t_squared() -> None:
    student, teacher, labels = make_inputs()
    plain = ForwardKLWithChunkedOutputLoss(temperature=3.0, temperature_squared=False)
    scaled = ForwardKLWithChunkedOutputLoss(temperature=3.0, temperature_squared=True)
    torch.testing.assert_close(
        scaled(student, teacher, labels), 9.0 * plain(student, teacher, labels)
    )


@pytest.mark.parametrize("name", NAMES)
def test_sum_and_num_tokens_reductions(name: str) -> None:
    cls, kwargs, ref, _ = CASES[name]
    student, teacher, labels = make_inputs()
    summed = value_and_grads(chunked(cls(reduction="sum", **kwargs), labels), student, teacher)
    expected = value_and_grads(
        lambda s, t: reference_loss(ref, s, t, labels, reduction="sum"),
        student.double(),
        teacher.double(),
    )
    assert_close_all(summed, expected, FP32_VALUE, {"rtol": 1e-5, "atol": 1e-6})

    mean = cls(**kwargs)
    for num_tokens in (1000, torch.tensor(1000)):
        ours = value_and_grads(chunked(mean, labels, num_tokens=num_tokens), student, teacher)
        expected = value_and_grads(
            lambda s, t: reference_loss(ref, s, t, labels, num_tokens=1000),
            student.double(),
            teacher.double(),
        )
        assert_close_all(ours, expected, FP32_VALUE, FP32_GRAD)


@pytest.mark.parametrize("name", NAMES)
def test_global_token_count_makes_micro_batches_add_up(name: str) -> None:
    """Two micro-batches divided by their joint token count sum to the joint batch's loss."""
    cls, kwargs, _, _ = CASES[name]
    loss = cls(**kwargs)
    student, teacher, labels = make_inputs(batch=4)
    global_count = (labels != -100).sum()
    halves = [
        loss(student[i : i + 2], teacher[i : i + 2], labels[i : i + 2], num_tokens=global_count)
        for i in (0, 2)
    ]
    torch.testing.assert_close(halves[0] + halves[1], loss(student, teacher, labels))


@pytest.mark.parametrize("reduction", ["mean", "sum", "mean_num_tokens_0"])
@pytest.mark.parametrize("name", NAMES)
def test_all_ignored_is_an_exact_connected_zero(name: str, reduction: str) -> None:
    cls, kwargs, _, _ = CASES[name]
    student, teacher, labels = make_inputs(ignored_fraction=1.0)
    num_tokens = 0 if reduction == "mean_num_tokens_0" else None
    loss = cls(reduction=reduction.split("_")[0], **kwargs)
    s = student.clone().requires_grad_(True)
    value = loss(split(s), split(teacher), labels, num_tokens=num_tokens)
    assert value.item() == 0.0
    assert value.requires_grad and value.grad_fn is not None
    value.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


# ------------------------------------------------------------------------------------------------
# Masked vocabulary


def masked_inputs(seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Inputs with ``-inf`` columns in both models, in the student only, in the teacher only,
    and scattered ``-inf`` entries (a top-k style masked teacher)."""
    student, teacher, labels = make_inputs(seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    neg_inf = float("-inf")
    student[..., 0:3] = neg_inf
    teacher[..., 0:3] = neg_inf
    student[..., 3:5] = neg_inf
    teacher[..., 5:7] = neg_inf
    teacher[torch.rand(teacher.shape, generator=g) < 0.2] = neg_inf
    student[torch.rand(student.shape, generator=g) < 0.05] = neg_inf
    teacher[..., 10] = 0.0  # every row keeps a finite column in both models
    student[..., 10] = 0.0
    return student, teacher, labels


@pytest.mark.parametrize("name", NAMES)
def test_neg_inf_columns_follow_the_documented_rule(name: str) -> None:
    cls, kwargs, _, ref_masked = CASES[name]
    student, teacher, labels = masked_inputs()
    ours = value_and_grads(chunked(cls(**kwargs), labels), student, teacher)
    expected = value_and_grads(
        lambda s, t: reference_loss(ref_masked, s, t, labels), student.double(), teacher.double()
    )
    for tensor in ours:
        assert torch.isfinite(tensor).all()
    assert_close_all(ours, expected, FP32_VALUE, FP32_GRAD)


@pytest.mark.parametrize("name", NAMES)
def test_columns_masked_in_both_models_contribute_nothing(name: str) -> None:
    cls, kwargs, _, _ = CASES[name]
    student, teacher, labels = make_inputs()
    padded_student = F.pad(student, (0, 5), value=float("-inf"))
    padded_teacher = F.pad(teacher, (0, 5), value=float("-inf"))
    loss = cls(**kwargs)
    ours = value_and_grads(chunked(loss, labels), padded_student, padded_teacher)
    plain = value_and_grads(chunked(loss, labels), student, teacher)
    torch.testing.assert_close(ours[0], plain[0])
    torch.testing.assert_close(ours[1][..., :VOCAB], plain[1])
    assert torch.equal(ours[1][..., VOCAB:], torch.zeros_like(ours[1][..., VOCAB:]))


# ------------------------------------------------------------------------------------------------
# Properties


@pytest.mark.parametrize("name", NAMES)
def test_zero_when_student_equals_teacher(name: str) -> None:
    cls, kwargs, _, _ = CASES[name]
    student, _, labels = make_inputs()
    value, grad, _ = value_and_grads(chunked(cls(**kwargs), labels), student, student, False)
    assert abs(value.item()) < 1e-6
    assert grad.abs().max().item() < 1e-6


def test_jsd_end_points_are_forward_and_reverse_kl() -> None:
    student, teacher, labels = make_inputs()
    pairs = [(0.0, ForwardKLWithChunkedOutputLoss()), (1.0, ReverseKLWithChunkedOutputLoss())]
    for beta, kl in pairs:
        jsd = value_and_grads(
            chunked(JSDWithChunkedOutputLoss(beta=beta), labels), student, teacher
        )
        expected = value_and_grads(chunked(kl, labels), student, teacher)
        assert_close_all(jsd, expected, FP32_VALUE, FP32_GRAD)


@pytest.mark.parametrize("name", NAMES)
def test_chunked_equals_unchunked(name: str) -> None:
    cls, kwargs, _, _ = CASES[name]
    student, teacher, labels = make_inputs()
    loss = cls(**kwargs)
    whole = value_and_grads(lambda s, t: loss(s, t, labels), student, teacher)
    for sizes in (UNEVEN, [6] * 7 + [5], [47]):
        pieces = value_and_grads(chunked(loss, labels, sizes), student, teacher)
        assert_close_all(pieces, whole, FP32_VALUE, FP32_GRAD)


def test_torch_chunk_may_return_fewer_chunks_than_configured() -> None:
    """A 10-token sequence with ``num_output_chunks=8``: ``torch.chunk`` gives 5 chunks."""
    student, teacher, labels = make_inputs(tokens=10)
    loss = ForwardKLWithChunkedOutputLoss(num_output_chunks=8)
    student_chunks, teacher_chunks = student.chunk(8, dim=1), teacher.chunk(8, dim=1)
    assert len(student_chunks) == 5
    torch.testing.assert_close(
        loss(list(student_chunks), list(teacher_chunks), labels), loss(student, teacher, labels)
    )


def test_teacher_gradient_only_when_required() -> None:
    student, teacher, labels = make_inputs()
    loss = ForwardKLWithChunkedOutputLoss()
    without = value_and_grads(chunked(loss, labels), student, teacher, False)
    with_teacher = value_and_grads(chunked(loss, labels), student, teacher, True)
    assert without[2] is None
    torch.testing.assert_close(without[1], with_teacher[1], rtol=0, atol=0)


def test_no_grad_evaluation_gives_the_same_value() -> None:
    student, teacher, labels = make_inputs()
    loss = SymmetricKLWithChunkedOutputLoss()
    with torch.no_grad():
        evaluated = loss(split(student.requires_grad_(True)), split(teacher), labels)
    assert not evaluated.requires_grad
    torch.testing.assert_close(evaluated, loss(split(student), split(teacher), labels))


def test_saves_only_the_gradient_in_the_logits_dtype() -> None:
    """What autograd keeps for backward is one bf16 gradient the size of the logits."""
    student, teacher, labels = make_inputs(dtype=torch.bfloat16, tokens=48, vocab=1000)
    student.requires_grad_(True)
    saved: list[weakref.ref] = []

    def pack(tensor: Tensor) -> Tensor:
        saved.append(weakref.ref(tensor))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        value = JSDWithChunkedOutputLoss()(split(student, [6] * 8), split(teacher, [6] * 8), labels)
    alive = [ref() for ref in saved if ref() is not None]
    large = [t for t in alive if t.numel() >= 1000]
    assert all(t.dtype == torch.bfloat16 for t in large)
    kept_bytes = sum(t.numel() * t.element_size() for t in large)
    assert kept_bytes == student.numel() * student.element_size()
    value.backward()
    assert student.grad.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------
# Vocabulary sizes


def test_vocab_mismatch_is_an_error_naming_both_sizes() -> None:
    student, teacher, labels = make_inputs(vocab=130, teacher_vocab=123)
    with pytest.raises(ValueError, match=r"130.*123.*vocab_columns"):
        ForwardKLWithChunkedOutputLoss()(student, teacher, labels)


@pytest.mark.parametrize("name", NAMES)
def test_vocab_columns_compares_the_first_columns(name: str) -> None:
    cls, kwargs, ref, _ = CASES[name]
    student, teacher, labels = make_inputs(vocab=130, teacher_vocab=126)
    loss = cls(vocab_columns=120, **kwargs)
    ours = value_and_grads(chunked(loss, labels), student, teacher)
    expected = value_and_grads(
        lambda s, t: reference_loss(ref, s[..., :120], t[..., :120], labels),
        student.double(),
        teacher.double(),
    )
    assert_close_all(ours, expected, FP32_VALUE, FP32_GRAD)
    assert torch.equal(ours[1][..., 120:], torch.zeros_like(ours[1][..., 120:]))


# ------------------------------------------------------------------------------------------------
# Cross-entropy


@pytest.mark.parametrize("ignore_index", [-100, 0, 7])
def test_cross_entropy_matches_f_cross_entropy(ignore_index: int) -> None:
    student, _, labels = make_inputs(ignore_index=ignore_index)
    loss = CEWithChunkedOutputLoss(ignore_index=ignore_index)
    count = int((labels != ignore_index).sum())
    for dtype, value_tol, grad_tol in (
        (torch.float32, FP32_VALUE, FP32_GRAD),
        (torch.bfloat16, BF16_VALUE, BF16_GRAD),
    ):
        logits = student.to(dtype)
        ours = value_and_grads(lambda s, _: loss(split(s), labels), logits, logits, False)
        expected = value_and_grads(
            lambda s, _: ref_cross_entropy(s, labels, ignore_index) / count,
            logits.double(),
            logits,
            False,
        )
        assert ours[1].dtype == dtype
        assert_close_all(ours[:2], expected[:2], value_tol, grad_tol)


def test_cross_entropy_reductions_and_all_ignored() -> None:
    student, _, labels = make_inputs()
    summed = CEWithChunkedOutputLoss(reduction="sum")(split(student), labels)
    torch.testing.assert_close(summed.double(), ref_cross_entropy(student, labels), **FP32_VALUE)
    mean = CEWithChunkedOutputLoss()(split(student), labels, num_tokens=500)
    torch.testing.assert_close(
        mean.double(), ref_cross_entropy(student, labels) / 500, **FP32_VALUE
    )
    logits = student.clone().requires_grad_(True)
    value = CEWithChunkedOutputLoss()(split(logits), torch.full_like(labels, -100))
    assert value.item() == 0.0 and value.grad_fn is not None
    value.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_cross_entropy_gradcheck_fp64() -> None:
    student, _, labels = make_inputs(batch=2, tokens=5, vocab=7, dtype=torch.float64)
    labels[1, 2] = -100
    loss = CEWithChunkedOutputLoss(num_output_chunks=3)
    student.requires_grad_(True)
    fn = lambda s: loss(split(s, [1, 4]), labels)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (student,))


# ------------------------------------------------------------------------------------------------
# Functional forms and the generic module


FUNCTIONS = {
    "forward_kl": (forward_kl_loss, {}),
    "reverse_kl": (reverse_kl_loss, {}),
    "symmetric_kl": (symmetric_kl_loss, {"ratio": 0.3}),
    "jsd": (jsd_loss, {"beta": 0.3}),
    "skew_forward_kl": (skew_forward_kl_loss, {"alpha": 0.2}),
    "skew_reverse_kl": (skew_reverse_kl_loss, {"alpha": 0.2}),
    "total_variation": (tvd_loss, {}),
}


@pytest.mark.parametrize("name", NAMES)
def test_functional_and_generic_forms_match_the_classes(name: str) -> None:
    cls, kwargs, _, _ = CASES[name]
    function, params = FUNCTIONS[name]
    student, teacher, labels = make_inputs()
    options = {"temperature": 2.0, "ignore_index": -100}
    module = cls(**kwargs, **options)
    expected = module(split(student), split(teacher), labels)
    generic = ChunkedKDLoss(module.divergence_name, module.divergence_params, **options)
    by_name = kd_loss(
        split(student),
        split(teacher),
        labels,
        divergence=module.divergence_name,
        divergence_params=module.divergence_params,
        **options,
    )
    for value in (
        generic(split(student), split(teacher), labels),
        by_name,
        function(split(student), split(teacher), labels, **params, **options),
    ):
        torch.testing.assert_close(value, expected, rtol=0, atol=0)
    assert module.divergence_name == name
    assert module.divergence_params == params


def test_ce_functional_form() -> None:
    student, _, labels = make_inputs()
    torch.testing.assert_close(
        ce_loss(split(student), labels), CEWithChunkedOutputLoss()(split(student), labels)
    )


# ------------------------------------------------------------------------------------------------
# torch.compile


@pytest.mark.slow
def test_torch_compile_matches_eager() -> None:
    """Compiled (aot_eager: dynamo and AOTAutograd, without CPU code generation, which takes
    over a minute on this machine) forward KL gives the eager value and gradient."""
    torch._dynamo.reset()
    student, teacher, labels = make_inputs(batch=2, tokens=16, vocab=32)
    loss = ForwardKLWithChunkedOutputLoss(num_output_chunks=4)
    compiled = torch.compile(loss, backend="aot_eager")
    ours = value_and_grads(chunked(compiled, labels, [4] * 4), student, teacher, False)
    eager = value_and_grads(chunked(loss, labels, [4] * 4), student, teacher, False)
    torch.testing.assert_close(ours[0], eager[0])
    torch.testing.assert_close(ours[1], eager[1])
    ignored = torch.full_like(labels, -100)
    value = compiled(split(student, [4] * 4), split(teacher.requires_grad_(True), [4] * 4), ignored)
    assert value.item() == 0.0 and value.grad_fn is not None


# ------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature_squared": "yes"}, "temperature_squared"),
        ({"reduction": "avg"}, "reduction"),
        ({"num_output_chunks": 0}, "num_output_chunks"),
        ({"num_output_chunks": 2.0}, "num_output_chunks"),
        ({"ignore_index": 1.5}, "ignore_index"),
        ({"vocab_columns": 0}, "vocab_columns"),
    ],
)
def test_bad_options_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ForwardKLWithChunkedOutputLoss(**kwargs)
    if "num_output_chunks" not in kwargs:  # the functional form has no chunk count
        student, teacher, labels = make_inputs()
        with pytest.raises(ValueError, match=match):
            kd_loss(student, teacher, labels, **kwargs)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: JSDWithChunkedOutputLoss(beta=1.5), "beta"),
        (lambda: SkewForwardKLWithChunkedOutputLoss(alpha=-0.1), "alpha"),
        (lambda: SymmetricKLWithChunkedOutputLoss(sym_kd_ratio=2.0), "ratio"),
        (lambda: ChunkedKDLoss("kl"), "Unknown divergence"),
        (lambda: ChunkedKDLoss("jsd", {"alpha": 0.5}), "unexpected"),
        (lambda: CEWithChunkedOutputLoss(reduction="none"), "reduction"),
    ],
)
def test_bad_divergence_options_raise(build: Callable, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()


def _bad_inputs() -> dict[str, tuple[Callable, str]]:
    """Case name -> (a function returning forward arguments, the expected message pattern)."""
    student, teacher, labels = make_inputs(tokens=12)
    s4, t4 = split(student, [3] * 4), split(teacher, [3] * 4)
    s12, t12 = split(student, [1] * 12), split(teacher, [1] * 12)
    return {
        "count": (lambda: (s4, t4[:3], labels), "4 chunks but teacher_logits has 3"),
        "too_many": (lambda: (s12, t12, labels), "12 chunks.*num_output_chunks=8"),
        "pair_shape": (
            lambda: (s4, split(teacher, [3, 3, 2, 4]), labels),
            r"student_logits\[2\] has shape \(3, 3, 123\) but teacher_logits\[2\]",
        ),
        "label_tokens": (
            lambda: (s4, t4, labels[:, :11]),
            r"labels has shape \(3, 11\).*\[3, 12\].*\[3, 3, 3, 3\]",
        ),
        "label_batch": (lambda: (s4, t4, labels[:2]), r"labels has shape \(2, 12\)"),
        "label_dim": (lambda: (s4, t4, labels.reshape(-1)), "labels must have shape"),
        "label_dtype": (lambda: (s4, t4, labels.float()), "integer"),
        "logits_dim": (lambda: (student.reshape(-1, VOCAB), teacher, labels), "student_logits"),
        "empty": (lambda: ([], [], labels), "empty list"),
        "int_logits": (lambda: (s4, [t.long() for t in t4], labels), "floating-point"),
        "vocab_in_list": (
            lambda: ([s4[0][..., :100], *s4[1:]], t4, labels),
            r"student_logits\[1\].*vocabulary",
        ),
        "vocab": (lambda: (student, teacher[..., :100], labels), "123.*100.*vocab_columns"),
    }


BAD_INPUTS = _bad_inputs()


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_raise_naming_the_mismatch(case: str) -> None:
    make, match = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=match):
        ForwardKLWithChunkedOutputLoss()(*make())


def test_bad_num_tokens_and_vocab_columns_raise() -> None:
    student, teacher, labels = make_inputs()
    with pytest.raises(ValueError, match=r"num_tokens.*reduction='sum'"):
        ForwardKLWithChunkedOutputLoss(reduction="sum")(student, teacher, labels, num_tokens=5)
    with pytest.raises(ValueError, match="num_tokens must be >= 0"):
        ForwardKLWithChunkedOutputLoss()(student, teacher, labels, num_tokens=-1)
    with pytest.raises(ValueError, match="one-element"):
        ForwardKLWithChunkedOutputLoss()(student, teacher, labels, num_tokens=torch.ones(2))
    with pytest.raises(ValueError, match="vocab_columns=200 exceeds"):
        ForwardKLWithChunkedOutputLoss(vocab_columns=200)(student, teacher, labels)
    with pytest.raises(ValueError, match=r"labels has shape"):
        CEWithChunkedOutputLoss()(student, labels[:, :-1])
    with pytest.raises(ValueError, match="num_output_chunks=2"):
        CEWithChunkedOutputLoss(num_output_chunks=2)(split(student), labels)
