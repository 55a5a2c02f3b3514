"""The module every kdtune loss builds on: :class:`KDLoss` (options checked once, one engine
call per forward).

The chunked family (:mod:`kdtune.losses.chunked`) and the fused loss (:mod:`kdtune.losses.fused`)
subclass it and only turn their inputs into sources (:mod:`kdtune.losses.sources`);
:meth:`KDLoss._run` builds the :class:`~kdtune.losses.engine.EngineCall` and runs it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from kdtune.losses._math import (
    TOPK_MODES,
    ChunkMath,
    TopKTeacher,
    Workspace,
    chunk_objective,
    supports_topk,
)
from kdtune.losses._options import check_common_options, check_kd_options
from kdtune.losses.divergences import DIVERGENCES, resolved_params
from kdtune.losses.engine import EngineCall, KDOutput, divisor, run_engine


class KDLoss(torch.nn.Module):
    """The base of every kdtune loss: ``isinstance(module, KDLoss)`` answers "is this a kdtune
    loss" (the chunked family, CE included, and the fused loss). Such a loss accepts
    ``num_tokens`` in its forward, has ``finite_logits`` and ``release_buffers()``, and compiles
    its per-chunk math only (``compile()``). The options shared by all, checked where the loss
    is built:

    Args:
        divergence: a name from :data:`kdtune.losses.divergences.DIVERGENCES`, built in or
            added with :func:`~kdtune.losses.register_divergence` (``None``: CE only).
        divergence_params: its parameters (``ratio``, ``beta`` or ``alpha`` for the built-ins,
            each in [0, 1]; a registered divergence's own, within its ``param_range``).
        ignore_index: label value of positions that do not contribute.
        temperature: the KD term divides both logit sets by it (> 0). A :class:`TopKTeacher`
            must have been cached at the same temperature (only the student is tempered).
        temperature_squared: multiply the KD term by ``temperature**2`` (Hinton et al.).
        reduction: ``"mean"`` or ``"sum"`` (the contract of :mod:`kdtune.losses.engine`).
        vocab_columns: ``None``: vocabulary sizes must match; N: the KD term compares the first N.
        topk_mode: with a :class:`TopKTeacher`: ``"bucket"`` compares the (k+1)-bucket
            distributions (the k ids and the rest mass; the student bucketed the same way, from
            its full softmax); ``"renormalize"`` (axolotl, DistillKit) renormalises the teacher
            over its k ids and the student's softmax over the same k ids (its logits gathered
            there; the other columns get no KD gradient).
        finite_logits: ``False`` (default): a dense chunk whose per-token KD values are not
            all finite (a ``-inf`` logit makes the closed forms meet ``0 * inf``) is redone by
            the masked-vocabulary rules of :mod:`kdtune.losses.divergences`; the check reads ``[rows]`` values on the
            host once per chunk. ``True``: the caller guarantees finite logits (a model's own
            output head, as in the KD recipe, which sets it), so nothing is read on the host.

    ``compile()`` compiles the per-chunk math only (not the chunk loop). On CPU the module keeps
    its chunk buffers (at most ``TEMPORARIES_PER_ROW`` fp32 ``[rows, V]``, about
    ``chunk_memory_mb`` for the fused loss) from one call to the next, since fresh memory there
    costs a page fault per 4 KiB on first write; ``release_buffers()`` frees them.
    """

    def __init__(
        self,
        divergence: str | None,
        divergence_params: dict[str, float] | None,
        ignore_index: int,
        *,
        temperature: float = 1.0,
        temperature_squared: bool = True,
        reduction: str = "mean",
        vocab_columns: int | None = None,
        topk_mode: str = "bucket",
        finite_logits: bool = False,
    ) -> None:
        super().__init__()
        self.divergence_name = divergence
        self.divergence_params: dict[str, float] = dict(divergence_params or {})
        resolved = resolved_params(divergence, self.divergence_params) if divergence else {}
        check_common_options(ignore_index, reduction)
        check_kd_options(temperature, temperature_squared, vocab_columns)
        if topk_mode not in TOPK_MODES:
            raise ValueError(f"topk_mode must be one of {list(TOPK_MODES)}, got {topk_mode!r}.")
        self.ignore_index = ignore_index
        self.temperature = temperature
        self.temperature_squared = temperature_squared
        self.reduction = reduction
        self.vocab_columns = vocab_columns
        self.topk_mode = topk_mode
        self.finite_logits = finite_logits
        self._params = tuple(sorted(resolved.items()))
        self._objective: Callable[..., Any] = chunk_objective
        self._cpu_workspace = Workspace(persistent=True)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Give each loss class its full signature (``**options`` spelled out), so that config
        checks and ``--help`` see every option and its default."""
        super().__init_subclass__(**kwargs)
        own = list(inspect.signature(cls.__init__).parameters.values())[1:]
        if own and own[-1].kind is inspect.Parameter.VAR_KEYWORD:
            names = {p.name for p in own}
            shared = inspect.signature(KDLoss.__init__).parameters.values()
            extra = [p for p in shared if p.kind is p.KEYWORD_ONLY and p.name not in names]
            own = own[:-1] + extra
        cls.__signature__ = inspect.Signature(own)

    def release_buffers(self) -> None:
        """Free the chunk buffers kept between calls on CPU (see :class:`Workspace`)."""
        self._cpu_workspace.clear()

    def compile(self, backend: str = "inductor", **kwargs: Any) -> None:  # type: ignore[override]
        """Compile the per-chunk math (:func:`chunk_objective` on finite dense chunks with a
        closed form) only; autograd fallbacks and sparse teachers stay eager."""
        self._objective = torch.compile(chunk_objective, backend=backend, **kwargs)

    def _chunk_math(self, teacher: Any, with_ce: bool, columns: int | None) -> ChunkMath:
        if isinstance(teacher, TopKTeacher) and not supports_topk(self.divergence_name):
            supported = [name for name, spec in DIVERGENCES.items() if spec.topk]
            raise ValueError(
                f"{type(self).__name__} with divergence={self.divergence_name!r} does not "
                f"support a TopKTeacher; use one of {supported} (a registered divergence "
                f"opts in with register_divergence(..., topk=True))."
            )
        return ChunkMath(
            divergence=self.divergence_name if teacher is not None else None,
            params=self._params,
            temperature=float(self.temperature),
            columns=columns,
            with_ce=with_ce,
            topk_mode=self.topk_mode,
        )

    def _run(
        self,
        math_: ChunkMath,
        student: Any,
        teacher: Any,
        labels: Tensor,
        label_pieces: list[Tensor],
        kd_ratio: float,
        num_tokens: Tensor | int | None,
        teacher_inputs: tuple[Tensor, ...] = (),
        reduction: str | None = None,
    ) -> KDOutput:
        first = student.inputs[0]
        dtype = torch.promote_types(first.dtype, torch.float32)
        call = EngineCall(
            math=math_,
            student=student,
            teacher=teacher,
            labels=label_pieces,
            ignore_index=self.ignore_index,
            kd_ratio=kd_ratio if math_.divergence is not None else 0.0,
            kd_scale=float(self.temperature) ** 2 if self.temperature_squared else 1.0,
            divisor=divisor(
                labels, self.ignore_index, reduction or self.reduction, num_tokens, dtype
            ),
            objective=self._objective,
            teacher_inputs=teacher_inputs,
            finite_logits=self.finite_logits,
            workspace=self._cpu_workspace if first.device.type == "cpu" else Workspace(),
        )
        return run_engine(call)

    def extra_repr(self) -> str:
        return (
            f"divergence={self.divergence_name!r}, divergence_params={self.divergence_params}, "
            f"ignore_index={self.ignore_index}, temperature={self.temperature}, "
            f"temperature_squared={self.temperature_squared}, reduction={self.reduction!r}, "
            f"vocab_columns={self.vocab_columns}, topk_mode={self.topk_mode!r}"
        )
