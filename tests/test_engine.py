"""The loss engine itself: one pass per chunk, compiled math, lean defaults, CUDA bf16 weights.

Values are checked against the engine's own eager path or the references of
tests/test_losses.py and tests/test_fused.py (imported by path, as the benchmarks do).
"""

from __future__ import annotations

import importlib.util
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from kdtune.losses import ChunkedKDLoss, FusedLinearKDLoss, TopKTeacher
from kdtune.losses._math import ChunkMath, Workspace, chunk_objective
from kdtune.losses.engine import TEMPORARIES_PER_ROW, rows_per_chunk

pytestmark = pytest.mark.usefixtures("one_thread_and_restored_torch_globals")


def _load(name: str):
    path = Path(__file__).with_name(name)
    spec = importlib.util.spec_from_file_location(f"_engine_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------------
# Vocabulary-sized temporaries of one chunk


class _NewLargeTensors(TorchDispatchMode):
    """Records ops whose output is new memory of at least ``numel`` elements (not in-place), and
    the most such outputs alive at once."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.ops, self.alive, self.peak = numel, [], [], 0

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
                self.ops.append(str(func.overloadpacket.__name__))
                self.alive = [ref for ref in self.alive if ref() is not None]
                self.alive.append(weakref.ref(tensor))
                self.peak = max(self.peak, len(self.alive))
        return out


def _count(divergence: str, dtype: torch.dtype, temperature: float = 1.0) -> _NewLargeTensors:
    rows, vocab = 16, 512
    g = torch.Generator().manual_seed(0)
    student = torch.randn(rows, vocab, generator=g).to(dtype)
    teacher = torch.randn(rows, vocab, generator=g).to(dtype)
    labels = torch.randint(0, vocab, (rows,), generator=g)
    keep = torch.ones(rows, dtype=torch.bool)
    weight = torch.full((rows,), 0.5)
    math_ = ChunkMath(divergence, temperature=temperature, with_ce=True)
    with _NewLargeTensors(rows * vocab) as mode:
        chunk_objective(math_, student, teacher, labels, keep, weight, weight, True, False, False)
    return mode


def test_forward_kl_with_ce_allocates_four_vocabulary_sized_buffers():
    """KD + CE of an fp32 chunk: log q, q, log p, p; the gradient reuses log q's buffer.

    bf16 chunks add one transient upcast per log_softmax. Guards the pass count.
    """
    fp32 = _count("forward_kl", torch.float32)
    assert fp32.ops == ["_log_softmax", "exp", "_log_softmax", "exp"]
    bf16 = _count("forward_kl", torch.bfloat16)
    assert len(bf16.ops) == 6 and bf16.ops.count("_to_copy") == 2
    for name in ("reverse_kl", "symmetric_kl", "jsd", "skew_forward_kl", "total_variation"):
        assert len(_count(name, torch.float32).ops) <= 6, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_workspace_buffers_give_bitwise_the_same_chunk_results(dtype):
    """The workspace only changes where buffers live: every divergence, both temperatures,
    with and without CE and the teacher gradient, a reused (dirty, larger) buffer included."""
    g = torch.Generator().manual_seed(5)
    student = torch.randn(6, 40, generator=g).to(dtype)
    teacher = torch.randn(6, 40, generator=g).to(dtype)
    labels = torch.randint(0, 40, (6,), generator=g)
    keep = torch.tensor([True, True, False, True, True, True])
    weight = torch.full((6,), 0.25) * keep
    ws = Workspace()
    for flat in ws.take((7, 40), torch.float32, student.device), ws.take((7, 40), dtype, "cpu"):
        flat.fill_(float("nan"))  # stale values from a "previous chunk"
    ws.reclaim()
    names = ("forward_kl", "reverse_kl", "symmetric_kl", "jsd", "skew_forward_kl")
    for name in (*names, "skew_reverse_kl", "total_variation", None):
        for temperature, with_ce, want_t in (
            (1.0, True, False),
            (2.0, True, True),
            (1.0, False, True),
        ):
            if name is None and not with_ce:
                continue
            math_ = ChunkMath(name, temperature=temperature, with_ce=with_ce)
            args = (math_, student, teacher, labels, keep, weight, weight, True, want_t, False)
            plain = chunk_objective(*args)
            reused = chunk_objective(*args, ws=ws)
            for a, b in zip(plain, reused, strict=True):
                assert (a is None) == (b is None), (name, temperature)
                if a is not None:
                    assert torch.equal(a, b), (name, temperature, with_ce)
            ws.reclaim()
    assert student.isfinite().all() and teacher.isfinite().all()  # inputs never written


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_chunks_reuse_their_buffers(dtype):
    """New vocabulary-sized allocations of one fused call do not grow with the chunk count
    (on CPU each fresh chunk-sized buffer is page-faulted in: 2-4x the op writing it)."""
    g = torch.Generator().manual_seed(6)
    vocab, dim, rows = 96, 8, 4

    def allocations(chunks: int) -> int:
        seq = rows * chunks
        hidden = torch.randn(1, seq, dim, generator=g).to(dtype).requires_grad_()
        weight = torch.randn(vocab, dim, generator=g).to(dtype).requires_grad_()
        with _NewLargeTensors(rows * vocab) as mode:  # [rows, V] and [V, D] tensors
            out = FusedLinearKDLoss(chunk_size=rows)(
                hidden,
                weight,
                torch.randint(0, vocab, (1, seq), generator=g),
                kd_ratio=0.5,
                teacher_hidden=hidden.detach(),
                teacher_weight=weight.detach() * 0.5,
            )
        out.loss.backward()
        assert hidden.grad.isfinite().all() and weight.grad.isfinite().all()
        return len(mode.ops)

    few, many = allocations(2), allocations(9)  # hidden-sized tensors stay below the count
    assert 0 < few == many


def test_cpu_loss_keeps_its_chunk_buffers_between_calls():
    """The second call with the same shapes allocates no chunk-sized buffer and gives bitwise
    the first call's results; a smaller call does not grow the pool; release_buffers frees it."""
    g = torch.Generator().manual_seed(8)
    vocab, dim, rows = 96, 8, 4
    loss_fn = FusedLinearKDLoss(chunk_size=rows)
    weight = torch.randn(vocab, dim, generator=g, requires_grad=True)

    def call(seq: int) -> tuple[int, list[Tensor]]:
        hidden = torch.randn(1, seq, dim, generator=torch.Generator().manual_seed(seq))
        hidden.requires_grad_()
        weight.grad = None
        with _NewLargeTensors(rows * vocab) as mode:
            out = loss_fn(
                hidden,
                weight,
                torch.arange(seq).remainder(vocab).view(1, seq),
                kd_ratio=0.5,
                teacher_hidden=hidden.detach() * 0.5,
                teacher_weight=weight.detach(),
            )
        out.loss.backward()
        chunk_sized = [op for op in mode.ops if op != "zeros"]  # the [V, D] accumulator
        return len(chunk_sized), [out.loss, out.kd_loss, hidden.grad, weight.grad]

    first_count, first = call(3 * rows)
    again_count, again = call(3 * rows)
    assert first_count > 0 and again_count == 0
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    kept = loss_fn._cpu_workspace.nbytes
    assert kept > 0
    call(rows - 1)  # shorter rows fit the kept buffers
    assert loss_fn._cpu_workspace.nbytes <= kept
    loss_fn.release_buffers()
    assert loss_fn._cpu_workspace.nbytes == 0
    assert call(3 * rows)[0] == first_count


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_chunk_budget_covers_every_divergence(dtype, temperature):
    """Buffers alive at once inside the objective, plus the chunk's two logit buffers and the
    gradient's input-dtype copy (fused path), stay within ``TEMPORARIES_PER_ROW``."""
    for name in ("forward_kl", "reverse_kl", "symmetric_kl", "jsd", "skew_reverse_kl"):
        peak = _count(name, dtype, temperature).peak
        assert peak + 3 <= TEMPORARIES_PER_ROW, (name, peak)


# ------------------------------------------------------------------------------------------------
# Compiled per-chunk math


def test_compiled_chunk_math_equals_eager_without_graph_breaks():
    """``compile()`` compiles :func:`chunk_objective` only (fullgraph: no break inside it)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # other tests' graph breaks are not this one's
    g = torch.Generator().manual_seed(1)
    student = torch.randn(2, 12, 40, generator=g, requires_grad=True)
    teacher = torch.randn(2, 12, 40, generator=g)
    labels = torch.randint(0, 40, (2, 12), generator=g)
    labels[0, :3] = -100
    eager = ChunkedKDLoss("jsd", {"beta": 0.4}, 4, temperature=2.0)
    compiled = ChunkedKDLoss("jsd", {"beta": 0.4}, 4, temperature=2.0)
    compiled.compile(backend="aot_eager", fullgraph=True)
    results = []
    for loss in (eager, compiled):
        out = loss.kd_and_ce(
            list(student.chunk(4, 1)), list(teacher.chunk(4, 1)), labels, kd_ratio=0.3
        )
        results.append((out.loss, *torch.autograd.grad(out.loss, student)))
    torch.testing.assert_close(results[1], results[0], rtol=1e-6, atol=1e-7)
    counters = torch._dynamo.utils.counters
    assert sum(counters["graph_break"].values()) == 0
    assert counters["stats"]["unique_graphs"] >= 1


# ------------------------------------------------------------------------------------------------
# Lean defaults


def test_default_chunk_rows_come_from_the_memory_budget():
    assert rows_per_chunk(4096, 128_256, num_chunks=8) == 261
    assert rows_per_chunk(16_384, 128_256, num_chunks=8) == 261  # flat in the sequence length
    assert rows_per_chunk(100, 128_256, num_chunks=8) == 13  # short inputs: num_chunks
    assert rows_per_chunk(4096, 128_256, chunk_size=64) == 64
    assert rows_per_chunk(4096, 128_256, num_chunks=8, memory_mb=256) == 65


class _LogitRows(TorchDispatchMode):
    """The most rows of any ``[rows, vocab]`` tensor an op creates (a chunk of logits)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.rows = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, tuple | list) else [out]:
            if isinstance(tensor, Tensor) and tensor.dim() == 2 and tensor.shape[1] == self.vocab:
                self.rows = max(self.rows, tensor.shape[0])
        return out


def test_default_fused_chunks_do_not_grow_with_the_sequence():
    g = torch.Generator().manual_seed(2)
    vocab, dim = 1024, 8
    weight = torch.randn(vocab, dim, generator=g, requires_grad=True)
    teacher_weight = torch.randn(vocab, dim, generator=g)
    budget_rows = rows_per_chunk(10**6, vocab, memory_mb=1)
    for seq in (8 * budget_rows, 32 * budget_rows):  # num_chunks=8 allows 32 and 128 rows
        hidden = torch.randn(1, seq, dim, generator=g, requires_grad=True)
        with _LogitRows(vocab) as mode:
            FusedLinearKDLoss(chunk_memory_mb=1)(
                hidden,
                weight,
                torch.zeros(1, seq, dtype=torch.long),
                kd_ratio=0.5,
                teacher_hidden=hidden.detach(),
                teacher_weight=teacher_weight,
            )
        assert mode.rows == budget_rows == 32


# ------------------------------------------------------------------------------------------------
# CUDA: bf16 tensor-core weight-gradient accumulation (fp32 output, row blocks)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_weight_gradient_accumulates_in_fp32():
    fused_tests = _load("test_fused.py")
    inputs = fused_tests.make_inputs(
        batch=4, seq=64, vocab=96, dim=32, teacher_dim=24, dtype=torch.bfloat16
    )
    inputs.pop("student_bias")
    inputs = {k: v.detach().cuda().requires_grad_(v.requires_grad) for k, v in inputs.items()}
    out = fused_tests.fused(FusedLinearKDLoss(chunk_size=2), inputs, kd_ratio=0.5)
    out.loss.backward()
    cpu = {k: v.detach().cpu() for k, v in inputs.items()}
    # CUDA's fp32-output matmul is exact up to fp32 summation order, so the CPU reference's
    # tolerance (one bf16 rounding of the fp32 sum) applies; a bf16 accumulator would not pass
    # (tests/test_fused.py::test_bf16_weight_gradient_accumulation_is_discriminating).
    # CUDA forms fp32 logits from bf16 inputs and multiplies the bf16-rounded logit gradient
    # by the hidden states with fp32 output: the same product in fp32 on the CPU, then one bf16
    # rounding of the sum (a bf16 accumulator over these 128 chunks is far off this tolerance:
    # tests/test_fused.py::test_bf16_weight_gradient_accumulation_is_discriminating).
    h = cpu["student_hidden"].reshape(-1, 32).float()
    logits = (h @ cpu["student_weight"].float().t()).requires_grad_()
    teacher = cpu["teacher_hidden"].reshape(-1, 24).float() @ cpu["teacher_weight"].float().t()
    loss, _, _ = fused_tests.reference_losses(logits, teacher, cpu["labels"], kd_ratio=0.5)
    (grad_logits,) = torch.autograd.grad(loss, [logits])
    expected = grad_logits.to(torch.bfloat16).float().t() @ h
    grad_weight = inputs["student_weight"].grad
    assert grad_weight.dtype == torch.bfloat16
    torch.testing.assert_close(
        grad_weight.float().cpu(), expected, rtol=2**-8, atol=1e-3 * expected.abs().max().item()
    )
    torch.testing.assert_close(out.loss.cpu(), loss.detach(), rtol=1e-4, atol=1e-5)


def test_topk_teacher_rows_follow_the_fused_chunks():
    """A TopKTeacher row is paired with its own token in every chunk layout."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 9, 4, generator=g)
    weight = torch.randn(20, 4, generator=g)
    labels = torch.randint(0, 20, (2, 9), generator=g)
    log_p = F.log_softmax(torch.randn(2, 9, 20, generator=g), -1)
    values, ids = log_p.topk(20, -1)
    teacher = TopKTeacher(ids, values, torch.full((2, 9), float("-inf")))
    dense = FusedLinearKDLoss(chunk_size=18)(
        hidden, weight, labels, kd_ratio=0.5, teacher_logits=log_p
    )
    for rows in (1, 4, 7):
        sparse = FusedLinearKDLoss(chunk_size=rows)(
            hidden, weight, labels, kd_ratio=0.5, teacher_topk=teacher
        )
        torch.testing.assert_close(sparse.loss, dense.loss)
