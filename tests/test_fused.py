"""Fused output projection + KD loss: values and gradients against plain references.

The references here form the full logits (``F.linear``) and compute every divergence from
``F.log_softmax`` and the cross-entropy with ``F.cross_entropy``, written out independently of
kdtune; where :mod:`kdtune.losses.chunked` exists, the fused loss is also compared with it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from kdtune.losses.engine import WeightGradAccumulator
from kdtune.losses.fused import FusedKDOutput, FusedLinearKDLoss, fused_linear_kd_loss

IGNORE = -100


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """These tensors are tiny: waking a second OpenMP thread for each microsecond-sized op costs
    milliseconds on a busy 2-core machine (measured: 8 ms per log_softmax of [2, 96])."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Every divergence with a non-trivial parameter value.
DIVERGENCES: list[tuple[str, dict[str, float]]] = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("symmetric_kl", {"ratio": 0.3}),
    ("jsd", {"beta": 0.3}),
    ("jsd", {"beta": 0.0}),
    ("skew_forward_kl", {"alpha": 0.2}),
    ("skew_reverse_kl", {"alpha": 0.2}),
    ("total_variation", {}),
]


# ------------------------------------------------------------------------------------------------
# The plain reference


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _log_mix(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    return (weight_a * log_a.exp() + (1 - weight_a) * log_b.exp()).log()


def reference_divergence(name: str, params: dict[str, float], s: Tensor, t: Tensor) -> Tensor:
    """Per-token divergence of ``softmax(t)`` (teacher p) and ``softmax(s)`` (student q)."""
    log_q, log_p = F.log_softmax(s, -1), F.log_softmax(t, -1)
    if name == "forward_kl":
        return _kl(log_p, log_q)
    if name == "reverse_kl":
        return _kl(log_q, log_p)
    if name == "symmetric_kl":
        return params["ratio"] * _kl(log_p, log_q) + (1 - params["ratio"]) * _kl(log_q, log_p)
    if name == "jsd":
        beta = params["beta"]
        if beta == 0.0:
            return _kl(log_p, log_q)
        log_m = _log_mix(log_p, log_q, beta)
        return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)
    if name == "skew_forward_kl":
        return _kl(log_p, _log_mix(log_p, log_q, params["alpha"]))
    if name == "skew_reverse_kl":
        return _kl(log_q, _log_mix(log_q, log_p, params["alpha"]))
    if name == "total_variation":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    raise AssertionError(name)


def reference_losses(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    divergence: str = "forward_kl",
    params: dict[str, float] | None = None,
    kd_ratio: float = 0.5,
    temperature: float = 1.0,
    temperature_squared: bool = True,
    reduction: str = "mean",
    num_tokens: float | None = None,
    vocab_columns: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss, kd, ce)`` from full ``[B, S, V]`` logits."""
    vocab_s = student_logits.shape[-1]
    s = student_logits.reshape(-1, vocab_s)
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    if vocab_columns is not None:
        s_kd, t = s[:, :vocab_columns], t[:, :vocab_columns]
    else:
        s_kd = s
    flat_labels = labels.reshape(-1)
    keep = flat_labels != IGNORE
    per_token = reference_divergence(divergence, params or {}, s_kd / temperature, t / temperature)
    kd_sum = (per_token * keep).sum() * (temperature**2 if temperature_squared else 1.0)
    ce_sum = F.cross_entropy(s, flat_labels, ignore_index=IGNORE, reduction="sum")
    if reduction == "sum":
        divisor = 1.0
    else:
        divisor = max(num_tokens if num_tokens is not None else keep.sum().item(), 1)
    kd, ce = kd_sum / divisor, ce_sum / divisor
    return kd_ratio * kd + (1 - kd_ratio) * ce, kd, ce


# ------------------------------------------------------------------------------------------------
# Inputs


def make_inputs(
    batch: int = 3,
    seq: int = 47,
    vocab: int = 123,
    dim: int = 17,
    teacher_dim: int = 13,
    teacher_vocab: int | None = None,
    dtype: torch.dtype = torch.float32,
    bias: bool = True,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Random hidden states, weights and labels; about 20% of the labels are ignored."""
    g = torch.Generator().manual_seed(seed)
    teacher_vocab = teacher_vocab or vocab

    def randn(*shape: int, scale: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[torch.rand(batch, seq, generator=g) < 0.2] = IGNORE
    inputs = {
        "student_hidden": randn(batch, seq, dim).requires_grad_(),
        "student_weight": randn(vocab, dim, scale=0.5).requires_grad_(),
        "teacher_hidden": randn(batch, seq, teacher_dim),
        "teacher_weight": randn(teacher_vocab, teacher_dim, scale=0.5),
        "labels": labels,
    }
    if bias:
        inputs["student_bias"] = randn(vocab, scale=0.5).requires_grad_()
    return inputs


def full_logits(inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    student = F.linear(
        inputs["student_hidden"], inputs["student_weight"], inputs.get("student_bias")
    )
    teacher = F.linear(inputs["teacher_hidden"], inputs["teacher_weight"])
    return student, teacher


def trainable(inputs: dict[str, Tensor]) -> list[Tensor]:
    return [inputs[k] for k in ("student_hidden", "student_weight", "student_bias") if k in inputs]


def fused(loss: FusedLinearKDLoss, inputs: dict[str, Tensor], **kwargs) -> FusedKDOutput:
    return loss(
        inputs["student_hidden"],
        inputs["student_weight"],
        inputs["labels"],
        teacher_hidden=inputs["teacher_hidden"],
        teacher_weight=inputs["teacher_weight"],
        student_bias=inputs.get("student_bias"),
        **kwargs,
    )


def grads(value: Tensor, tensors: list[Tensor]) -> list[Tensor]:
    return list(torch.autograd.grad(value, tensors))


def assert_all_close(actual: list[Tensor], expected: list[Tensor], **tol) -> None:
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, **tol)


FP32_TOL = {"rtol": 1e-5, "atol": 1e-6}


# ------------------------------------------------------------------------------------------------
# fp32 exactness against the plain reference


@pytest.mark.parametrize(("divergence", "params"), DIVERGENCES)
def test_every_divergence_matches_full_logits_reference(divergence, params):
    inputs = make_inputs()
    loss_fn = FusedLinearKDLoss(divergence, params, chunk_size=29, temperature=1.7)
    out = fused(loss_fn, inputs, kd_ratio=0.3)
    student, teacher = full_logits(inputs)
    ref = reference_losses(
        student,
        teacher,
        inputs["labels"],
        divergence=divergence,
        params=params,
        kd_ratio=0.3,
        temperature=1.7,
    )
    torch.testing.assert_close(out.loss, ref[0], **FP32_TOL)
    torch.testing.assert_close(out.kd_loss, ref[1].detach(), **FP32_TOL)
    torch.testing.assert_close(out.ce_loss, ref[2].detach(), **FP32_TOL)
    assert_all_close(
        grads(out.loss, trainable(inputs)), grads(ref[0], trainable(inputs)), **FP32_TOL
    )


@pytest.mark.parametrize(
    "options",
    [
        {"reduction": "sum"},
        {"temperature": 2.0, "temperature_squared": False},
        {"num_tokens": 200},
        {"num_tokens": torch.tensor(77)},
        {"kd_ratio": 0.0},
        {"kd_ratio": 1.0},
    ],
    ids=["sum", "no_t_squared", "num_tokens_int", "num_tokens_tensor", "ce_only", "kd_only"],
)
def test_options_match_reference(options):
    options = dict(options)
    kd_ratio = options.pop("kd_ratio", 0.6)
    num_tokens = options.pop("num_tokens", None)
    inputs = make_inputs(seed=1)
    out = fused(
        FusedLinearKDLoss(num_chunks=4, **options), inputs, kd_ratio=kd_ratio, num_tokens=num_tokens
    )
    student, teacher = full_logits(inputs)
    ref = reference_losses(
        student,
        teacher,
        inputs["labels"],
        kd_ratio=kd_ratio,
        num_tokens=float(num_tokens) if num_tokens is not None else None,
        **options,
    )
    torch.testing.assert_close(out.loss, ref[0], **FP32_TOL)
    torch.testing.assert_close(out.kd_loss, ref[1].detach(), **FP32_TOL)
    assert_all_close(
        grads(out.loss, trainable(inputs)), grads(ref[0], trainable(inputs)), **FP32_TOL
    )


def test_gradcheck_fp64():
    inputs = make_inputs(batch=1, seq=4, vocab=7, dim=3, teacher_dim=2, dtype=torch.float64)
    loss_fn = FusedLinearKDLoss("symmetric_kl", {"ratio": 0.3}, chunk_size=3, temperature=1.5)

    def loss_of(hidden: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        return loss_fn(
            hidden,
            weight,
            inputs["labels"],
            kd_ratio=0.6,
            teacher_hidden=inputs["teacher_hidden"],
            teacher_weight=inputs["teacher_weight"],
            student_bias=bias,
        ).loss

    assert torch.autograd.gradcheck(loss_of, tuple(trainable(inputs)))


def test_chunking_does_not_change_the_result():
    inputs = make_inputs(seed=2)
    one = fused(FusedLinearKDLoss(num_chunks=1), inputs, kd_ratio=0.5)
    many = fused(FusedLinearKDLoss(chunk_size=7), inputs, kd_ratio=0.5)
    more_chunks_than_rows = fused(FusedLinearKDLoss(num_chunks=1000), inputs, kd_ratio=0.5)
    one_grads = grads(one.loss, trainable(inputs))
    for other in (many, more_chunks_than_rows):
        torch.testing.assert_close(other.loss, one.loss, **FP32_TOL)
        assert_all_close(grads(other.loss, trainable(inputs)), one_grads, **FP32_TOL)


def test_precomputed_teacher_logits_match_teacher_hidden():
    inputs = make_inputs(seed=3)
    loss_fn = FusedLinearKDLoss("jsd", {"beta": 0.5}, chunk_size=16)
    from_hidden = fused(loss_fn, inputs, kd_ratio=0.7)
    teacher_logits = F.linear(inputs["teacher_hidden"], inputs["teacher_weight"])
    from_logits = loss_fn(
        inputs["student_hidden"],
        inputs["student_weight"],
        inputs["labels"],
        kd_ratio=0.7,
        teacher_logits=teacher_logits.to(torch.bfloat16).float(),  # any float dtype works
        student_bias=inputs["student_bias"],
    )
    exact = loss_fn(
        inputs["student_hidden"],
        inputs["student_weight"],
        inputs["labels"],
        kd_ratio=0.7,
        teacher_logits=teacher_logits,
        student_bias=inputs["student_bias"],
    )
    torch.testing.assert_close(exact.loss, from_hidden.loss, **FP32_TOL)
    assert_all_close(
        grads(exact.loss, trainable(inputs)), grads(from_hidden.loss, trainable(inputs)), **FP32_TOL
    )
    torch.testing.assert_close(from_logits.loss, from_hidden.loss, rtol=1e-2, atol=1e-3)


def test_teacher_bias_is_applied():
    inputs = make_inputs(seed=4, bias=False)
    teacher_bias = torch.randn(inputs["teacher_weight"].shape[0])
    out = fused(FusedLinearKDLoss(), inputs, kd_ratio=1.0, teacher_bias=teacher_bias)
    student, _ = full_logits(inputs)
    teacher = F.linear(inputs["teacher_hidden"], inputs["teacher_weight"], teacher_bias)
    ref, _, _ = reference_losses(student, teacher, inputs["labels"], kd_ratio=1.0)
    torch.testing.assert_close(out.loss, ref, **FP32_TOL)


def test_vocab_columns_compares_leading_columns_and_ce_uses_whole_student_vocab():
    inputs = make_inputs(vocab=130, teacher_vocab=128, seed=5)
    out = fused(FusedLinearKDLoss(vocab_columns=123, chunk_size=50), inputs, kd_ratio=0.5)
    student, teacher = full_logits(inputs)
    ref = reference_losses(student, teacher, inputs["labels"], vocab_columns=123)
    torch.testing.assert_close(out.loss, ref[0], **FP32_TOL)
    torch.testing.assert_close(out.ce_loss, ref[2].detach(), **FP32_TOL)
    assert_all_close(
        grads(out.loss, trainable(inputs)), grads(ref[0], trainable(inputs)), **FP32_TOL
    )


def test_all_ignored_gives_connected_exact_zero():
    inputs = make_inputs(batch=2, seq=5, seed=6)
    inputs["labels"].fill_(IGNORE)
    out = fused(FusedLinearKDLoss(), inputs, kd_ratio=0.5)
    assert out.loss.item() == 0.0 and out.kd_loss.item() == 0.0 and out.ce_loss.item() == 0.0
    assert out.loss.requires_grad
    for grad in grads(out.loss, trainable(inputs)):
        assert torch.equal(grad, torch.zeros_like(grad))


def test_kd_and_ce_outputs_are_detached_and_loss_is_the_mix():
    inputs = make_inputs(seed=7)
    out = fused(FusedLinearKDLoss(), inputs, kd_ratio=0.25)
    assert not out.kd_loss.requires_grad and not out.ce_loss.requires_grad
    torch.testing.assert_close(out.loss.detach(), 0.25 * out.kd_loss + 0.75 * out.ce_loss)


def test_no_grad_evaluation_gives_the_same_values():
    inputs = make_inputs(seed=8)
    loss_fn = FusedLinearKDLoss("reverse_kl", chunk_size=20)
    with_grad = fused(loss_fn, inputs, kd_ratio=0.5)
    with torch.no_grad():
        without = fused(loss_fn, inputs, kd_ratio=0.5)
    assert without.loss.grad_fn is None
    torch.testing.assert_close(without.loss, with_grad.loss.detach(), **FP32_TOL)
    torch.testing.assert_close(without.kd_loss, with_grad.kd_loss, **FP32_TOL)


def test_backward_scales_by_upstream_gradient():
    inputs = make_inputs(seed=9)
    out = fused(FusedLinearKDLoss(), inputs, kd_ratio=0.5)
    unit = grads(out.loss, trainable(inputs))
    out = fused(FusedLinearKDLoss(), inputs, kd_ratio=0.5)
    scaled = grads(out.loss * 3.0, trainable(inputs))
    assert_all_close(scaled, [3.0 * g for g in unit], **FP32_TOL)


# ------------------------------------------------------------------------------------------------
# Frozen weight, tied embeddings, memory kept for backward


def test_frozen_weight_gets_no_gradient():
    inputs = make_inputs(seed=10, bias=False)
    inputs["student_weight"].requires_grad_(False)
    out = fused(FusedLinearKDLoss(), inputs, kd_ratio=0.5)
    out.loss.backward()
    assert inputs["student_weight"].grad is None
    student, teacher = full_logits(inputs)
    ref, _, _ = reference_losses(student, teacher, inputs["labels"])
    (ref_grad,) = grads(ref, [inputs["student_hidden"]])
    torch.testing.assert_close(inputs["student_hidden"].grad, ref_grad, **FP32_TOL)


def test_only_hidden_and_weight_sized_gradients_are_kept_for_backward():
    inputs = make_inputs(batch=2, seq=9, vocab=50, dim=6, seed=11)
    out = fused(FusedLinearKDLoss(chunk_size=4), inputs, kd_ratio=0.5)
    shapes = sorted(tuple(t.shape) for t in out.loss.grad_fn.saved_tensors if t is not None)
    assert shapes == sorted([(18, 6), (50, 6), (50,)])


def test_tied_embedding_gradient_has_both_uses():
    """One weight used as the input embedding and as the output projection (TiedLinear)."""
    inputs = make_inputs(batch=2, seq=11, vocab=40, dim=8, seed=12, bias=False)
    embedding = torch.nn.Embedding(40, 8)
    tokens = torch.randint(0, 40, (2, 11), generator=torch.Generator().manual_seed(0))
    hidden = torch.tanh(embedding(tokens))
    out = FusedLinearKDLoss()(
        hidden,
        embedding.weight,
        inputs["labels"],
        kd_ratio=0.5,
        teacher_hidden=inputs["teacher_hidden"],
        teacher_weight=inputs["teacher_weight"],
    )
    (fused_grad,) = grads(out.loss, [embedding.weight])
    hidden = torch.tanh(embedding(tokens))
    _, teacher = full_logits(inputs)
    ref, _, _ = reference_losses(F.linear(hidden, embedding.weight), teacher, inputs["labels"])
    (ref_grad,) = grads(ref, [embedding.weight])
    torch.testing.assert_close(fused_grad, ref_grad, **FP32_TOL)


# ------------------------------------------------------------------------------------------------
# bf16: fp32 chunk math and fp32 weight-gradient accumulation


def _bf16_reference_grads(inputs: dict[str, Tensor], kd_ratio: float) -> tuple[Tensor, ...]:
    """What exact math gives from the CPU's bf16 logits (bf16 matmul, upcast).

    Returns ``(loss, grad_hidden, grad_weight)``; the logit gradient is fp32, the hidden
    gradient an fp32 matmul on upcast inputs (no rounding but the final one), the weight
    gradient the contract of the default accumulation: the products of the bf16-rounded logit
    gradient and the hidden states, summed in fp64 (fp32 in the loss).
    """
    h, w = inputs["student_hidden"].detach(), inputs["student_weight"].detach()
    student = torch.mm(h.reshape(-1, h.shape[-1]), w.t()).float().requires_grad_()
    teacher = torch.mm(
        inputs["teacher_hidden"].reshape(-1, inputs["teacher_hidden"].shape[-1]),
        inputs["teacher_weight"].t(),
    ).float()
    loss, _, _ = reference_losses(student, teacher, inputs["labels"], kd_ratio=kd_ratio)
    (grad_logits,) = torch.autograd.grad(loss, [student])
    grad_hidden = (grad_logits @ w.float()).reshape(h.shape)
    rounded = grad_logits.to(torch.bfloat16).double()
    grad_weight = (rounded.t() @ h.reshape(-1, h.shape[-1]).double()).float()
    return loss, grad_hidden, grad_weight


# Small: 128 accumulations of tiny fp32 matmuls. Large enough for oneDNN's bf16 matrix path on
# CPUs that have one (the weight gradient's products then use the bf16-rounded logit gradient).
# The fp32 sum is kept in row blocks of WeightGradAccumulator.ROW_BLOCK rows (one at this vocab
# unless the block is made smaller).
BF16_SHAPES = {
    "many_small_chunks": (dict(batch=4, seq=64, vocab=96, dim=32, teacher_dim=24), 2, None),
    "onednn_sized": (dict(batch=2, seq=256, vocab=4096, dim=256, teacher_dim=192), 128, None),
    "row_blocks": (dict(batch=2, seq=256, vocab=4096, dim=256, teacher_dim=192), 128, 1000),
}


@pytest.mark.parametrize("shape", BF16_SHAPES)
def test_bf16_matches_fp32_math_within_bf16_rounding(shape: str, monkeypatch):
    sizes, rows, row_block = BF16_SHAPES[shape]
    if row_block is not None:
        monkeypatch.setattr(WeightGradAccumulator, "ROW_BLOCK", row_block)
    inputs = make_inputs(**sizes, dtype=torch.bfloat16)
    inputs.pop("student_bias")
    out = fused(FusedLinearKDLoss(chunk_size=rows), inputs, kd_ratio=0.5)
    out.loss.backward()
    ref_loss, ref_grad_hidden, ref_grad_weight = _bf16_reference_grads(inputs, 0.5)
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref_loss.detach(), rtol=1e-5, atol=1e-6)
    grad_weight = inputs["student_weight"].grad
    assert grad_weight.dtype == torch.bfloat16
    # One bf16 rounding of the fp32 sum: within half a bf16 ulp (2**-9 relative), plus slack
    # for fp32 summation order. Accumulating the 128 chunks in bf16 would be far off this.
    torch.testing.assert_close(
        grad_weight.float(), ref_grad_weight, rtol=2**-8, atol=1e-3 * ref_grad_weight.abs().max()
    )
    # The hidden gradient is a bf16 matmul of the bf16-rounded logit gradient.
    torch.testing.assert_close(
        inputs["student_hidden"].grad.float(), ref_grad_hidden, rtol=2e-2, atol=2e-3
    )


def test_bf16_weight_gradient_accumulation_is_discriminating():
    """The tolerance above rejects a bf16 accumulator (guards the test itself)."""
    inputs = make_inputs(batch=4, seq=64, vocab=96, dim=32, teacher_dim=24, dtype=torch.bfloat16)
    inputs.pop("student_bias")
    _, _, ref_grad_weight = _bf16_reference_grads(inputs, 0.5)
    h = inputs["student_hidden"].detach().reshape(-1, 32).float()
    w = inputs["student_weight"].detach()
    student = torch.mm(inputs["student_hidden"].detach().reshape(-1, 32), w.t()).float()
    student.requires_grad_()
    teacher = torch.mm(
        inputs["teacher_hidden"].reshape(-1, 24), inputs["teacher_weight"].t()
    ).float()
    loss, _, _ = reference_losses(student, teacher, inputs["labels"], kd_ratio=0.5)
    (grad_logits,) = torch.autograd.grad(loss, [student])
    bf16_sum = torch.zeros_like(w)
    for rows in torch.split(torch.arange(h.shape[0]), 2):  # the same 128 chunks
        bf16_sum += (grad_logits[rows].t() @ h[rows]).to(torch.bfloat16)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(
            bf16_sum.float(),
            ref_grad_weight,
            rtol=2**-8,
            atol=1e-3 * ref_grad_weight.abs().max(),
        )


def test_bf16_weight_gradient_accumulated_in_the_input_dtype():
    """``weight_grad_accumulation="input_dtype"``: a bf16 accumulator, one bf16
    matmul-accumulate per chunk (as Liger and autograd over a chunked head); nothing else moves."""
    inputs = make_inputs(batch=4, seq=64, vocab=96, dim=32, teacher_dim=24, dtype=torch.bfloat16)
    inputs.pop("student_bias")
    rows = 16
    _, ref_grad_hidden, _ = _bf16_reference_grads(inputs, 0.5)
    default = fused(FusedLinearKDLoss(chunk_size=rows), inputs, kd_ratio=0.5)
    default_grads = grads(default.loss, trainable(inputs))
    out = fused(
        FusedLinearKDLoss(chunk_size=rows, weight_grad_accumulation="input_dtype"),
        inputs,
        kd_ratio=0.5,
    )
    grad_hidden, grad_weight = grads(out.loss, trainable(inputs))
    assert torch.equal(out.loss, default.loss) and torch.equal(grad_hidden, default_grads[0])
    assert grad_weight.dtype == torch.bfloat16
    # Independent: the same chunks summed by bf16 addmm_ from the reference logit gradient.
    h = inputs["student_hidden"].detach().reshape(-1, 32)
    w = inputs["student_weight"].detach()
    student = torch.mm(h, w.t()).float().requires_grad_()
    teacher = torch.mm(inputs["teacher_hidden"].reshape(-1, 24), inputs["teacher_weight"].t())
    loss, _, _ = reference_losses(student, teacher.float(), inputs["labels"], kd_ratio=0.5)
    (grad_logits,) = torch.autograd.grad(loss, [student])
    expected = torch.zeros_like(w)
    for start in range(0, h.shape[0], rows):
        chunk = slice(start, start + rows)
        expected.addmm_(grad_logits[chunk].to(torch.bfloat16).t(), h[chunk])
    torch.testing.assert_close(grad_weight, expected, rtol=2**-7, atol=2e-3 * expected.abs().max())
    # Less precise than the default (the fp32 sum), but close to the exact gradient.
    exact = (grad_logits.double().t() @ h.double()).float()
    error = (grad_weight.float() - exact).norm() / exact.norm()
    default_error = (default_grads[1].float() - exact).norm() / exact.norm()
    assert default_error < error < 2e-2
    torch.testing.assert_close(grad_hidden.float(), ref_grad_hidden, rtol=2e-2, atol=2e-3)


def test_input_dtype_accumulation_leaves_fp32_weights_alone():
    inputs = make_inputs(seed=21)
    results = []
    for accumulation in ("fp32", "input_dtype"):
        loss = FusedLinearKDLoss(chunk_size=13, weight_grad_accumulation=accumulation)
        results.append(grads(fused(loss, inputs, kd_ratio=0.5).loss, trainable(inputs)))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_weight_grad_accumulation_is_checked():
    with pytest.raises(ValueError, match=r"weight_grad_accumulation.*'bf16'"):
        FusedLinearKDLoss(weight_grad_accumulation="bf16")


# ------------------------------------------------------------------------------------------------
# Against the chunked family (when present)


def _chunked_module():
    return pytest.importorskip("kdtune.losses.chunked")


@pytest.mark.parametrize(("divergence", "params"), DIVERGENCES)
def test_matches_chunked_family_fp32(divergence, params):
    chunked = _chunked_module()
    inputs = make_inputs(seed=13)
    options = {"temperature": 1.3, "reduction": "mean"}
    out = fused(
        FusedLinearKDLoss(divergence, params, chunk_size=31, **options), inputs, kd_ratio=0.4
    )
    student, teacher = full_logits(inputs)
    kd = chunked.ChunkedKDLoss(divergence, params, 8, **options)(
        list(student.chunk(8, dim=1)), list(teacher.chunk(8, dim=1)), inputs["labels"]
    )
    ce = chunked.CEWithChunkedOutputLoss(8)(list(student.chunk(8, dim=1)), inputs["labels"])
    expected = 0.4 * kd + 0.6 * ce
    torch.testing.assert_close(out.loss, expected, **FP32_TOL)
    torch.testing.assert_close(out.kd_loss, kd.detach(), **FP32_TOL)
    torch.testing.assert_close(out.ce_loss, ce.detach(), **FP32_TOL)
    assert_all_close(
        grads(out.loss, trainable(inputs)), grads(expected, trainable(inputs)), **FP32_TOL
    )


def test_matches_chunked_family_bf16():
    """bf16 inputs: the chunked family fed by a bf16 model head (the recipe's other path)."""
    chunked = _chunked_module()
    inputs = make_inputs(batch=2, seq=40, vocab=80, dim=24, dtype=torch.bfloat16, bias=False)
    out = fused(FusedLinearKDLoss("jsd", {"beta": 0.5}, chunk_size=16), inputs, kd_ratio=0.5)
    student, teacher = full_logits(inputs)
    kd = chunked.JSDWithChunkedOutputLoss(4, beta=0.5)(
        list(student.chunk(4, dim=1)), list(teacher.chunk(4, dim=1)), inputs["labels"]
    )
    ce = chunked.CEWithChunkedOutputLoss(4)(list(student.chunk(4, dim=1)), inputs["labels"])
    expected = 0.5 * kd + 0.5 * ce
    torch.testing.assert_close(out.loss, expected, rtol=1e-3, atol=1e-3)
    # bf16 gradients: the chunked path rounds the weight gradient's matmul output to bf16 and
    # the logit gradient to bf16; ours accumulates in fp32. Agreement within bf16 precision.
    for ours, theirs in zip(grads(out.loss, trainable(inputs)), grads(expected, trainable(inputs))):
        torch.testing.assert_close(
            ours.float(), theirs.float(), rtol=2e-2, atol=2e-2 * theirs.abs().max().item()
        )


def test_from_chunked_copies_divergence_and_options():
    chunked = _chunked_module()
    source = chunked.JSDWithChunkedOutputLoss(
        4, -1, beta=0.25, temperature=2.0, temperature_squared=False, reduction="sum"
    )
    loss_fn = FusedLinearKDLoss.from_chunked(source, chunk_size=64)
    assert (loss_fn.divergence_name, loss_fn.divergence_params) == ("jsd", {"beta": 0.25})
    assert (loss_fn.num_chunks, loss_fn.chunk_size, loss_fn.ignore_index) == (4, 64, -1)
    assert (loss_fn.temperature, loss_fn.temperature_squared, loss_fn.reduction) == (
        2.0,
        False,
        "sum",
    )


def test_from_torchtune_chunked_loss():
    from torchtune.modules.loss import SymmetricKLWithChunkedOutputLoss

    loss_fn = FusedLinearKDLoss.from_chunked(
        SymmetricKLWithChunkedOutputLoss(num_output_chunks=4, sym_kd_ratio=0.7, ignore_index=-5)
    )
    assert loss_fn.divergence_name == "symmetric_kl"
    assert loss_fn.divergence_params == {"ratio": 0.7}
    assert (loss_fn.num_chunks, loss_fn.ignore_index) == (4, -5)
    with pytest.raises(ValueError, match="from_chunked"):
        FusedLinearKDLoss.from_chunked(torch.nn.Linear(2, 2))


def test_functional_form_equals_module():
    inputs = make_inputs(seed=14)
    module_out = fused(FusedLinearKDLoss("skew_forward_kl", {"alpha": 0.1}), inputs, kd_ratio=0.5)
    functional_out = fused_linear_kd_loss(
        inputs["student_hidden"],
        inputs["student_weight"],
        inputs["labels"],
        kd_ratio=0.5,
        teacher_hidden=inputs["teacher_hidden"],
        teacher_weight=inputs["teacher_weight"],
        student_bias=inputs["student_bias"],
        divergence="skew_forward_kl",
        divergence_params={"alpha": 0.1},
    )
    torch.testing.assert_close(functional_out.loss, module_out.loss)


# ------------------------------------------------------------------------------------------------
# Errors


def _call_kwargs(**overrides) -> dict:
    """Valid keyword arguments of a small call, with ``overrides`` applied."""
    inputs = make_inputs(batch=2, seq=5, vocab=11, dim=4, teacher_dim=3, bias=False)
    kwargs = {
        "student_hidden": inputs["student_hidden"],
        "student_weight": inputs["student_weight"],
        "labels": inputs["labels"],
        "kd_ratio": 0.5,
        "teacher_hidden": inputs["teacher_hidden"],
        "teacher_weight": inputs["teacher_weight"],
    }
    kwargs.update(overrides)
    return kwargs


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"student_hidden": torch.randn(10, 4)}, r"student_hidden must have shape"),
        ({"student_weight": torch.randn(4, 11)}, r"student_weight has shape .* not its transpose"),
        ({"student_weight": torch.randn(11, 4, dtype=torch.float64)}, r"one dtype"),
        ({"student_bias": torch.randn(7)}, r"student_bias must be \[11\]"),
        ({"labels": torch.zeros(2, 6, dtype=torch.long)}, r"labels has shape"),
        ({"labels": torch.zeros(2, 5)}, r"labels must be an integer tensor"),
        ({"teacher_hidden": torch.randn(2, 4, 3)}, r"teacher_hidden has shape"),
        ({"teacher_weight": torch.randn(12, 3)}, r"vocabulary size 11 differs .* vocab_columns"),
        ({"teacher_weight": None}, r"teacher_weight is missing"),
        ({"teacher_logits": torch.randn(2, 5, 11)}, r"either teacher_hidden .* or teacher_logits"),
        (
            {"teacher_hidden": None, "teacher_weight": None},
            r"either teacher_hidden .* or teacher_logits",
        ),
        (
            {"teacher_hidden": None, "teacher_weight": None, "teacher_logits": torch.randn(2, 5)},
            r"teacher_logits must have shape",
        ),
        ({"kd_ratio": 1.5}, r"kd_ratio must be a number in \[0, 1\]"),
        ({"num_tokens": torch.tensor([1, 2])}, r"num_tokens must be a one-element tensor"),
    ],
)
def test_bad_inputs_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        FusedLinearKDLoss()(**_call_kwargs(**overrides))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"divergence": "kl"}, r"Unknown divergence"),
        ({"divergence": "jsd", "divergence_params": {"alpha": 0.1}}, r"unexpected"),
        ({"num_chunks": 0}, r"num_chunks must be >= 1"),
        ({"chunk_size": 0}, r"chunk_size must be >= 1"),
        ({"temperature": 0.0}, r"temperature must be a finite number > 0"),
        ({"reduction": "none"}, r"reduction must be one of"),
        ({"vocab_columns": 0}, r"vocab_columns must be >= 1"),
        ({"temperature_squared": 1}, r"temperature_squared must be True or False"),
    ],
)
def test_bad_options_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FusedLinearKDLoss(**kwargs)


def test_vocab_columns_beyond_the_vocabularies_is_rejected():
    with pytest.raises(ValueError, match=r"vocab_columns=20 exceeds"):
        FusedLinearKDLoss(vocab_columns=20)(**_call_kwargs())


def test_num_tokens_with_sum_reduction_is_rejected():
    with pytest.raises(ValueError, match=r"num_tokens is only used with reduction='mean'"):
        FusedLinearKDLoss(reduction="sum")(**_call_kwargs(), num_tokens=3)


def test_module_repr_lists_options():
    text = repr(FusedLinearKDLoss("jsd", {"beta": 0.5}, chunk_size=128))
    assert "divergence='jsd'" in text and "chunk_size=128" in text
