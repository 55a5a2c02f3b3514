"""The engine's extension point: a divergence is one function and one registry entry.

- A divergence registered without a closed form (here a squared Hellinger distance and an
  alpha-divergence, written below in plain torch) is differentiated by autograd of its reference,
  one chunk at a time, inside the same engine: the chunked and the fused losses match a naive
  full-logits reference written independently in this file, and a tiny model trains with it.
- Every closed form (the fast path) equals that autograd fallback of its own reference: values
  and gradients, fp32 and bf16, odd shapes, ignored rows, temperature, vocab_columns, the
  teacher's gradient, the fused projection.
- ``isinstance(module, KDLoss)`` tells a kdtune loss, and every such loss takes ``num_tokens``.
"""

from __future__ import annotations

import inspect
import math
import weakref
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

import kdtune.losses as losses
from kdtune.losses import (
    DIVERGENCES,
    ChunkedKDLoss,
    Divergence,
    FusedLinearKDLoss,
    KDLoss,
    TopKTeacher,
    register_divergence,
)
from kdtune.losses.engine import AUTOGRAD_TEMPORARIES_PER_ROW, rows_per_chunk

pytestmark = pytest.mark.usefixtures("one_thread_and_restored_torch_globals")

IGNORE = -100


# ------------------------------------------------------------------------------------------------
# Brand-new divergences, in plain torch: (student [N, V], teacher [N, V]) -> [N]


def squared_hellinger(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """``1 - sum_v sqrt(p_v q_v)``, from log-probabilities (a ``-inf`` column gives 0)."""
    log_q = F.log_softmax(student_logits, dim=-1)
    log_p = F.log_softmax(teacher_logits, dim=-1)
    return 1.0 - torch.exp(0.5 * (log_q + log_p)).sum(dim=-1)


def alpha_divergence(student_logits: Tensor, teacher_logits: Tensor, alpha: float = 0.5) -> Tensor:
    """Amari's alpha-divergence ``(1 - sum_v p^alpha q^(1 - alpha)) / (alpha (1 - alpha))``."""
    log_q = F.log_softmax(student_logits, dim=-1)
    log_p = F.log_softmax(teacher_logits, dim=-1)
    overlap = torch.exp(alpha * log_p + (1.0 - alpha) * log_q).sum(dim=-1)
    return (1.0 - overlap) / (alpha * (1.0 - alpha))


@pytest.fixture
def new_divergences() -> Iterator[None]:
    """Registers the two divergences above for one test (the registry is process-wide)."""
    register_divergence("squared_hellinger", squared_hellinger, topk=True)
    register_divergence("alpha", alpha_divergence, param_range=(0.05, 0.95))
    yield
    del DIVERGENCES["squared_hellinger"], DIVERGENCES["alpha"]


# ------------------------------------------------------------------------------------------------
# The naive reference: full logits, probabilities written out, no chunks, autograd


def naive_divergence(name: str, s: Tensor, t: Tensor, alpha: float = 0.5) -> Tensor:
    p, q = F.softmax(t.double(), -1), F.softmax(s.double(), -1)
    if name == "squared_hellinger":
        return 0.5 * ((p.sqrt() - q.sqrt()) ** 2).sum(-1)  # = 1 - sum sqrt(p q)
    if name == "alpha":
        return (1.0 - (p**alpha * q ** (1.0 - alpha)).sum(-1)) / (alpha * (1.0 - alpha))
    raise AssertionError(name)


def naive_loss(
    name: str,
    student: Tensor,
    teacher: Tensor,
    labels: Tensor,
    *,
    kd_ratio: float,
    temperature: float = 1.0,
    vocab_columns: int | None = None,
    alpha: float = 0.5,
) -> Tensor:
    """``kd_ratio * T² * mean KD + (1 - kd_ratio) * mean CE`` over the non-ignored tokens."""
    s = student.reshape(-1, student.shape[-1])
    t = teacher.reshape(-1, teacher.shape[-1])
    columns = vocab_columns or s.shape[-1]
    flat = labels.reshape(-1)
    keep = flat != IGNORE
    kd = naive_divergence(name, s[:, :columns] / temperature, t[:, :columns] / temperature, alpha)
    count = keep.sum().clamp(min=1)
    kd_mean = (kd * keep).sum() / count * temperature**2
    ce_mean = F.cross_entropy(s.double(), flat, ignore_index=IGNORE, reduction="sum") / count
    return kd_ratio * kd_mean + (1.0 - kd_ratio) * ce_mean


def make_logits(
    batch: int = 3,
    tokens: int = 47,
    vocab: int = 123,
    teacher_vocab: int | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Student ``[B, S, V]``, teacher ``[B, S, V_t]`` logits, labels ``[B, S]`` (~25% ignored)."""
    g = torch.Generator().manual_seed(seed)
    teacher = 2.0 * torch.randn(batch, tokens, teacher_vocab or vocab, generator=g)
    student = torch.randn(batch, tokens, vocab, generator=g)
    shared = min(vocab, teacher.shape[-1])
    student[..., :shared] += teacher[..., :shared]
    labels = torch.randint(0, vocab, (batch, tokens), generator=g)
    labels[torch.rand(batch, tokens, generator=g) < 0.25] = IGNORE
    labels[0, :9] = IGNORE  # a whole chunk of ignored rows
    return student.to(dtype), teacher.to(dtype), labels


def make_projection(
    batch: int = 3,
    tokens: int = 47,
    vocab: int = 123,
    teacher_vocab: int | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 1,
) -> dict[str, Tensor]:
    """Hidden states and output weights (student with a bias) for the fused loss."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    labels = torch.randint(0, vocab, (batch, tokens), generator=g)
    labels[torch.rand(batch, tokens, generator=g) < 0.25] = IGNORE
    return {
        "student_hidden": randn(batch, tokens, 17).requires_grad_(),
        "student_weight": randn(vocab, 17, scale=0.5).requires_grad_(),
        "student_bias": randn(vocab, scale=0.5).requires_grad_(),
        "teacher_hidden": randn(batch, tokens, 13),
        "teacher_weight": randn(teacher_vocab or vocab, 13, scale=0.5),
        "labels": labels,
    }


TRAINABLE = ("student_hidden", "student_weight", "student_bias")
UNEVEN = [13, 0, 20, 14]  # chunk lengths over 47 tokens, an empty one included


def chunks(x: Tensor) -> list[Tensor]:
    return list(x.split(UNEVEN, dim=1))


def fused_call(loss: FusedLinearKDLoss, inputs: dict[str, Tensor], kd_ratio: float):
    return loss(
        inputs["student_hidden"],
        inputs["student_weight"],
        inputs["labels"],
        kd_ratio=kd_ratio,
        teacher_hidden=inputs["teacher_hidden"],
        teacher_weight=inputs["teacher_weight"],
        student_bias=inputs["student_bias"],
    )


def assert_close(actual: Tensor, expected: Tensor, rtol: float, atol_scale: float) -> None:
    """``rtol`` and an absolute tolerance relative to the largest expected magnitude."""
    atol = atol_scale * expected.abs().max().item() + 1e-12
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------------------------
# (a) A brand-new divergence against the naive reference, chunked and fused


@pytest.mark.usefixtures("new_divergences")
@pytest.mark.parametrize(
    ("name", "params", "temperature", "teacher_vocab", "vocab_columns"),
    [
        ("squared_hellinger", {}, 1.0, None, None),
        ("squared_hellinger", {}, 2.0, 130, 120),
        ("alpha", {"alpha": 0.3}, 1.5, None, None),
    ],
)
def test_new_divergence_chunked_matches_naive_reference(
    name, params, temperature, teacher_vocab, vocab_columns
):
    student, teacher, labels = make_logits(teacher_vocab=teacher_vocab)
    loss_fn = ChunkedKDLoss(
        name, params, num_output_chunks=4, temperature=temperature, vocab_columns=vocab_columns
    )
    s = student.clone().requires_grad_()
    t = teacher.clone().requires_grad_()  # the teacher's gradient too
    out = loss_fn.kd_and_ce(chunks(s), chunks(t), labels, kd_ratio=0.3)
    ours = torch.autograd.grad(out.loss, [s, t])

    s_ref = student.double().requires_grad_()
    t_ref = teacher.double().requires_grad_()
    ref = naive_loss(
        name, s_ref, t_ref, labels, kd_ratio=0.3, temperature=temperature,
        vocab_columns=vocab_columns, **params,
    )  # fmt: skip
    expected = torch.autograd.grad(ref, [s_ref, t_ref])
    assert_close(out.loss, ref, 1e-5, 1e-6)
    for mine, theirs in zip(ours, expected, strict=True):
        assert_close(mine, theirs, 1e-4, 1e-5)
    # forward (KD alone) is the same KD term
    kd_only = loss_fn(chunks(student), chunks(teacher), labels)
    kd_ref = naive_loss(
        name, student, teacher, labels, kd_ratio=1.0, temperature=temperature,
        vocab_columns=vocab_columns, **params,
    )  # fmt: skip
    assert_close(kd_only, kd_ref, 1e-5, 1e-6)


@pytest.mark.usefixtures("new_divergences")
@pytest.mark.parametrize(("name", "params"), [("squared_hellinger", {}), ("alpha", {"alpha": 0.7})])
def test_new_divergence_fused_matches_naive_reference(name, params):
    inputs = make_projection()
    loss_fn = FusedLinearKDLoss(name, params, chunk_size=29, temperature=1.7)
    out = fused_call(loss_fn, inputs, kd_ratio=0.4)
    ours = torch.autograd.grad(out.loss, [inputs[k] for k in TRAINABLE])

    leaves = {k: inputs[k].detach().double().requires_grad_() for k in TRAINABLE}
    student = F.linear(leaves["student_hidden"], leaves["student_weight"], leaves["student_bias"])
    teacher = F.linear(inputs["teacher_hidden"].double(), inputs["teacher_weight"].double())
    ref = naive_loss(
        name, student, teacher, inputs["labels"], kd_ratio=0.4, temperature=1.7, **params
    )
    expected = torch.autograd.grad(ref, [leaves[k] for k in TRAINABLE])
    assert_close(out.loss, ref, 1e-5, 1e-6)
    for mine, theirs in zip(ours, expected, strict=True):
        assert_close(mine, theirs, 1e-4, 1e-5)


@pytest.mark.usefixtures("new_divergences")
@pytest.mark.parametrize("mode", ["bucket", "renormalize"])
def test_new_divergence_with_a_full_topk_teacher_equals_the_dense_teacher(mode):
    """k = V: the sparse teacher holds the whole distribution, so both modes give the dense loss."""
    student, teacher, labels = make_logits(tokens=11, vocab=40)
    log_p = F.log_softmax(teacher, -1)
    values, ids = log_p.topk(40, -1)
    topk = TopKTeacher(ids, values, torch.full(labels.shape, float("-inf")))
    loss_fn = ChunkedKDLoss("squared_hellinger", num_output_chunks=2, topk_mode=mode)
    results = []
    for t in (topk, teacher):
        s = student.clone().requires_grad_()
        out = loss_fn.kd_and_ce(list(s.chunk(2, 1)), t if t is topk else list(t.chunk(2, 1)),
                                labels, kd_ratio=0.6)  # fmt: skip
        results.append((out.loss, *torch.autograd.grad(out.loss, [s])))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-7)


class _LogitRows(TorchDispatchMode):
    """The most rows of any new ``[rows, vocab]`` tensor an op creates (views left out)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.rows = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
        seen = {t.untyped_storage().data_ptr() for t in inputs}
        out = func(*args, **kwargs)
        for tensor in out if isinstance(out, tuple | list) else [out]:
            if (
                isinstance(tensor, Tensor)
                and tensor.untyped_storage().data_ptr() not in seen
                and tensor.dim() == 2
                and tensor.shape[1] == self.vocab
            ):
                self.rows = max(self.rows, tensor.shape[0])
        return out


@pytest.mark.usefixtures("new_divergences")
def test_autograd_fallback_stays_chunked():
    """The fallback differentiates one chunk at a time: no ``[B * S, V]`` tensor is formed, in
    the forward (where every gradient is made) nor in the backward."""
    inputs = make_projection(batch=2, tokens=40, vocab=96)
    with _LogitRows(96) as mode:
        out = fused_call(FusedLinearKDLoss("squared_hellinger", chunk_size=8), inputs, 0.5)
        out.loss.backward()
    assert mode.rows == 8
    assert all(inputs[k].grad.isfinite().all() for k in TRAINABLE)


@pytest.mark.usefixtures("new_divergences")
def test_autograd_fallback_handles_masked_columns():
    """A ``-inf`` logit in a fallback divergence: finite loss and gradient, as its reference says."""
    student, teacher, labels = make_logits(tokens=10, vocab=30)
    teacher[..., 3] = float("-inf")
    student[..., 5] = float("-inf")
    s = student.clone().requires_grad_()
    loss = ChunkedKDLoss("squared_hellinger", num_output_chunks=2)(
        list(s.chunk(2, 1)), list(teacher.chunk(2, 1)), labels
    )
    (grad,) = torch.autograd.grad(loss, [s])
    ref = naive_loss("squared_hellinger", student, teacher, labels, kd_ratio=1.0)
    assert_close(loss, ref, 1e-5, 1e-6)
    assert grad.isfinite().all()


class _PeakNewTensors(TorchDispatchMode):
    """The most new tensors of at least ``numel`` elements alive at once (views left out)."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.alive, self.peak = numel, [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
        seen = {t.untyped_storage().data_ptr() for t in inputs}
        out = func(*args, **kwargs)
        for tensor in out if isinstance(out, tuple | list) else [out]:
            if (
                isinstance(tensor, Tensor)
                and tensor.numel() >= self.numel
                and tensor.untyped_storage().data_ptr() not in seen
            ):
                self.alive = [ref for ref in self.alive if ref() is not None]
                self.alive.append(weakref.ref(tensor))
                self.peak = max(self.peak, len(self.alive))
        return out


@pytest.mark.usefixtures("new_divergences")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_autograd_fallback_fits_its_chunk_budget(dtype, autograd_twin):
    """Vocabulary-sized tensors alive at once in a fallback chunk (the reference's graph
    included), plus the chunk's two logit buffers and the gradient's input-dtype copy, stay
    within ``AUTOGRAD_TEMPORARIES_PER_ROW``, which sizes the fused loss's default chunks."""
    rows, vocab = 16, 512
    student, teacher, labels = make_logits(batch=1, tokens=rows, vocab=vocab, dtype=dtype)
    builtin = dict.fromkeys(name for name, _ in CLOSED_FORMS)  # at their default parameters
    names = ["squared_hellinger", *(autograd_twin(name) for name in builtin)]
    for name in names:
        for temperature in (1.0, 2.0):
            loss_fn = ChunkedKDLoss(name, num_output_chunks=1, temperature=temperature)
            s = student.clone().requires_grad_()
            with _PeakNewTensors(rows * vocab) as mode:
                loss_fn.kd_and_ce([s], [teacher], labels, kd_ratio=0.5)
            assert mode.peak + 3 <= AUTOGRAD_TEMPORARIES_PER_ROW, (name, mode.peak)
    hidden = torch.zeros(1, 10**4, 4, dtype=dtype)
    weight = torch.zeros(vocab, 4, dtype=dtype)
    with _LogitRows(vocab) as mode:
        FusedLinearKDLoss("squared_hellinger", chunk_memory_mb=1)(
            hidden, weight, torch.zeros(1, 10**4, dtype=torch.long), kd_ratio=0.5,
            teacher_logits=torch.zeros(1, 10**4, vocab, dtype=dtype),
        )  # fmt: skip
    expected = rows_per_chunk(10**4, vocab, memory_mb=1, temporaries=AUTOGRAD_TEMPORARIES_PER_ROW)
    assert mode.rows == expected < rows_per_chunk(10**4, vocab, memory_mb=1)


@pytest.mark.usefixtures("new_divergences")
def test_compile_leaves_the_autograd_fallback_eager():
    """``compile()`` compiles the closed-form chunk math; a fallback chunk runs eagerly (autograd
    inside a compiled region would break the graph) and gives the same numbers."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    student, teacher, labels = make_logits(tokens=12, vocab=40)
    eager = ChunkedKDLoss("squared_hellinger", num_output_chunks=3, temperature=2.0)
    compiled = ChunkedKDLoss("squared_hellinger", num_output_chunks=3, temperature=2.0)
    compiled.compile(backend="aot_eager", fullgraph=True)
    results = []
    for loss_fn in (eager, compiled):
        s = student.clone().requires_grad_()
        out = loss_fn.kd_and_ce(
            list(s.chunk(3, 1)), list(teacher.chunk(3, 1)), labels, kd_ratio=0.3
        )
        results.append((out.loss, *torch.autograd.grad(out.loss, [s])))
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0


# ------------------------------------------------------------------------------------------------
# (b) Training with it: a tiny model, chunked and fused, the loss falls


class TinyLM(torch.nn.Module):
    """Embedding ``[V, D]`` -> tanh -> output projection ``[V, D]``: ``[B, S]`` -> ``[B, S, V]``."""

    def __init__(self, vocab: int, dim: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(vocab, dim)
        self.output = torch.nn.Linear(dim, vocab, bias=False)

    def hidden(self, tokens: Tensor) -> Tensor:
        return torch.tanh(self.embed(tokens))

    def forward(self, tokens: Tensor) -> Tensor:
        return self.output(self.hidden(tokens))


def _train(path: str, steps: int = 25) -> list[float]:
    vocab, dim = 64, 16
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, vocab, (4, 24), generator=g)
    labels = torch.roll(tokens, -1, dims=1)
    labels[:, -1] = IGNORE
    with torch.no_grad():
        teacher = 3.0 * TinyLM(vocab, dim, seed=1)(tokens)
    student = TinyLM(vocab, dim, seed=2)
    optimizer = torch.optim.Adam(student.parameters(), lr=0.05)
    chunked = ChunkedKDLoss("squared_hellinger", num_output_chunks=3)
    fused = FusedLinearKDLoss("squared_hellinger", num_chunks=3)
    history = []
    for _ in range(steps):
        optimizer.zero_grad()
        if path == "chunked":
            out = chunked.kd_and_ce(
                list(student(tokens).chunk(3, 1)), list(teacher.chunk(3, 1)), labels, kd_ratio=1.0
            )
        else:
            out = fused(
                student.hidden(tokens),
                student.output.weight,
                labels,
                kd_ratio=1.0,
                teacher_logits=teacher,
            )
        out.loss.backward()
        optimizer.step()
        history.append(out.kd_loss.item())
    return history


@pytest.mark.usefixtures("new_divergences")
def test_a_tiny_model_trains_with_the_new_divergence_chunked_and_fused():
    chunked, fused = _train("chunked"), _train("fused")
    assert all(math.isfinite(v) for v in chunked + fused)
    assert chunked[-1] < 0.5 * chunked[0], chunked
    # Same model, same data: the two entry points follow the same trajectory.
    assert fused == pytest.approx(chunked, rel=1e-4, abs=1e-6)


# ------------------------------------------------------------------------------------------------
# Every closed form equals the autograd fallback of its own reference


CLOSED_FORMS: list[tuple[str, dict[str, float]]] = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("symmetric_kl", {"ratio": 0.3}),
    ("jsd", {"beta": 0.3}),
    ("jsd", {"beta": 0.0}),
    ("jsd", {"beta": 1.0}),
    ("skew_forward_kl", {"alpha": 0.2}),
    ("skew_forward_kl", {"alpha": 0.0}),
    ("skew_reverse_kl", {"alpha": 0.2}),
    ("skew_reverse_kl", {"alpha": 1.0}),
    ("total_variation", {}),
]
# Per-dtype tolerances: both paths compute in fp32 from the same inputs; bf16 gradients are
# rounded to bf16 at the end, where a last-bit difference in fp32 can flip one bf16 rounding.
TOLERANCES = {
    torch.float32: {"value": (1e-5, 1e-6), "grad": (1e-4, 1e-5)},
    torch.bfloat16: {"value": (1e-5, 1e-6), "grad": (2**-7, 2**-8)},
}


@pytest.fixture
def autograd_twin() -> Iterator:
    """``twin(name)``: ``name``'s reference registered again without its closed form."""
    added = []

    def twin(name: str) -> str:
        spec = DIVERGENCES[name]
        register_divergence(f"{name}_by_autograd", spec.reference, topk=spec.topk)
        added.append(f"{name}_by_autograd")
        return added[-1]

    yield twin
    for name in added:
        del DIVERGENCES[name]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("name", "params"), CLOSED_FORMS)
def test_chunked_closed_form_equals_autograd_fallback(name, params, dtype, autograd_twin):
    twin = autograd_twin(name)
    tol = TOLERANCES[dtype]
    cases = [  # (temperature, teacher vocab, vocab_columns, ignore_index, with CE)
        (1.0, None, None, IGNORE, True),  # the shared CE/KD log-softmax (fast path)
        (2.0, 130, 120, IGNORE, True),
        (0.7, None, None, 5, False),  # KD alone; a label id as ignore_index
    ]
    for temperature, teacher_vocab, columns, ignore_index, with_ce in cases:
        student, teacher, labels = make_logits(teacher_vocab=teacher_vocab, dtype=dtype)
        labels = torch.where(labels == IGNORE, ignore_index, labels)
        results = []
        for divergence in (name, twin):
            loss_fn = ChunkedKDLoss(
                divergence, params, 4, ignore_index, temperature=temperature, vocab_columns=columns
            )
            s = student.clone().requires_grad_()
            t = teacher.clone().requires_grad_()
            if with_ce:
                out = loss_fn.kd_and_ce(chunks(s), chunks(t), labels, kd_ratio=0.4)
                values = (out.loss, out.kd_loss, out.ce_loss)
            else:
                values = (loss_fn(chunks(s), chunks(t), labels),)
            results.append((values, torch.autograd.grad(values[0], [s, t])))
        for closed, fallback in zip(results[0][0], results[1][0], strict=True):
            assert_close(closed, fallback, *tol["value"])
        for closed, fallback in zip(results[0][1], results[1][1], strict=True):
            assert closed.dtype == fallback.dtype == dtype
            assert_close(closed, fallback, *tol["grad"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("name", "params"), CLOSED_FORMS)
def test_fused_closed_form_equals_autograd_fallback(name, params, dtype, autograd_twin):
    twin = autograd_twin(name)
    tol = TOLERANCES[dtype]
    inputs = make_projection(teacher_vocab=130, dtype=dtype)
    results = []
    for divergence in (name, twin):
        loss_fn = FusedLinearKDLoss(
            divergence, params, chunk_size=29, temperature=1.7, vocab_columns=120
        )
        out = fused_call(loss_fn, inputs, kd_ratio=0.3)
        grads = torch.autograd.grad(out.loss, [inputs[k] for k in TRAINABLE])
        results.append(((out.loss, out.kd_loss, out.ce_loss), grads))
    for closed, fallback in zip(results[0][0], results[1][0], strict=True):
        assert_close(closed, fallback, *tol["value"])
    for closed, fallback in zip(results[0][1], results[1][1], strict=True):
        assert_close(closed, fallback, *tol["grad"])


def test_every_builtin_divergence_has_a_closed_form():
    """The fast path covers the built-ins (a regression here would only show as a slowdown)."""
    builtin = [
        "forward_kl", "reverse_kl", "symmetric_kl", "jsd",
        "skew_forward_kl", "skew_reverse_kl", "total_variation",
    ]  # fmt: skip
    for name in builtin:
        assert DIVERGENCES[name].closed_form is not None, name


# ------------------------------------------------------------------------------------------------
# The registration API


def test_registration_errors_are_named():
    with pytest.raises(ValueError, match="'forward_kl' is already registered"):
        register_divergence("forward_kl", squared_hellinger)
    with pytest.raises(ValueError, match="must take \\(student_logits, teacher_logits\\)"):
        register_divergence("one_argument", lambda s: s.sum(-1))
    with pytest.raises(ValueError, match="must be callable"):
        register_divergence("not_callable", squared_hellinger, closed_form=3)
    assert "one_argument" not in DIVERGENCES and "not_callable" not in DIVERGENCES


@pytest.mark.usefixtures("new_divergences")
def test_registered_parameters_are_checked_where_the_loss_is_built():
    assert DIVERGENCES["alpha"] == Divergence(alpha_divergence, param_range=(0.05, 0.95))
    assert DIVERGENCES["alpha"].params == {"alpha": 0.5}
    with pytest.raises(ValueError, match=r"alpha must be in \[0.05, 0.95\], got 1.0"):
        ChunkedKDLoss("alpha", {"alpha": 1.0})
    with pytest.raises(ValueError, match="takes parameters none, got unexpected \\['beta'\\]"):
        FusedLinearKDLoss("squared_hellinger", {"beta": 0.5})
    student, teacher, labels = make_logits(tokens=4, vocab=10)
    topk = TopKTeacher(*teacher.topk(3, -1)[::-1], torch.zeros(labels.shape))
    with pytest.raises(ValueError, match=r"does not support a TopKTeacher.*topk=True"):
        ChunkedKDLoss("alpha")(student, topk, labels)


# ------------------------------------------------------------------------------------------------
# One isinstance check: "is this a kdtune loss"


def _exported_loss_classes() -> list[type]:
    return [
        obj
        for obj in vars(losses).values()
        if isinstance(obj, type) and issubclass(obj, torch.nn.Module) and obj is not KDLoss
    ]


def test_every_kdtune_loss_is_a_kdloss_and_takes_num_tokens():
    classes = _exported_loss_classes()
    assert len(classes) >= 13  # the chunked family, CE, the flat classes, the fused loss
    for cls in classes:
        assert issubclass(cls, KDLoss), cls
        assert "num_tokens" in inspect.signature(cls.forward).parameters, cls
    for loss in (losses.CEWithChunkedOutputLoss(), FusedLinearKDLoss(), losses.ForwardKLLoss()):
        assert isinstance(loss, KDLoss) and loss.finite_logits is False


def test_torchtune_losses_are_not_kdlosses():
    from torchtune.modules.loss import CEWithChunkedOutputLoss, ForwardKLWithChunkedOutputLoss

    assert not isinstance(ForwardKLWithChunkedOutputLoss(), KDLoss)
    assert not isinstance(CEWithChunkedOutputLoss(), KDLoss)


def test_flat_loss_num_tokens_is_the_divisor():
    student, teacher, labels = make_logits(tokens=6, vocab=12)
    loss_fn = losses.ForwardKLLoss()
    total = loss_fn(student, teacher, labels, normalize=False)
    torch.testing.assert_close(loss_fn(student, teacher, labels, num_tokens=50), total / 50)


# ------------------------------------------------------------------------------------------------
# The recipe picks a registered divergence by name (kd_loss.divergence=...)


@pytest.mark.usefixtures("new_divergences")
@pytest.mark.parametrize(
    ("config", "loss_keys"),
    [
        ("tiny/full_chunked", ["kd_loss._component_=kdtune.losses.ChunkedKDLoss"]),
        ("tiny/full_fused", []),
    ],
    ids=["chunked", "fused"],
)
def test_the_recipe_trains_with_a_registered_divergence(
    config, loss_keys, kdtune_run, tiny_assets, tmp_path
):
    from kdtune.training.metrics import read_metrics

    output_dir = tmp_path / "out"
    kdtune_run(
        config,
        [
            f"assets_dir={tiny_assets.root}",
            f"output_dir={output_dir}",
            *loss_keys,
            "kd_loss.divergence=squared_hellinger",
            "kd_ratio=1.0",  # the divergence alone: its own gradient must do the training
            "max_steps_per_epoch=6",
            "validate_every_n_steps=null",
        ],
    )
    records = read_metrics(output_dir, kind="train")
    assert [r["step"] for r in records] == list(range(1, 7))
    kd = [r["kd_loss"] for r in records]
    assert all(0.0 <= v <= 1.0 for v in kd), kd  # a squared Hellinger distance is in [0, 1]
    assert [r["loss"] for r in records] == kd
    assert sum(kd[-2:]) < 0.8 * sum(kd[:2]), kd
