"""The non-finite guard: a step whose loss or gradient norm is NaN/inf never goes unnoticed and
never reaches a checkpoint; a step without a target token is counted, never a stop.

Every rank sees the same numbers: the step's losses are summed over ranks (a NaN on one rank
makes the sum NaN everywhere), the gradient norm covers every rank's shards and the token count
is all-reduced, so every rank takes the same decision at the same step, with no collective of
its own.

``on_non_finite: stop`` (default) adds no host sync: the step's values wait on the device, as
for logging, and :meth:`NonFiniteGuard.check_records` reads them at the next logging step, and
always before a validation or a checkpoint (the step log is flushed first). The first bad step
stops the run with :class:`NonFiniteError`; the steps between it and the check ran on
non-finite weights but nothing after it is ever saved. ``on_non_finite: skip`` reads one flag
per step (:meth:`NonFiniteGuard.skip_update`, one host sync) so that the optimizer update of a
bad step is left out; the step still counts (data, learning-rate schedule), its record has
``"skipped": true``, and the run stops once ``max_non_finite_steps`` steps were skipped.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from kdtune.training.checkpoint.layout import checkpoints_root, step_dirname
from kdtune.training.process_group import all_reduce_sum

SKIPPED_KEY = "non_finite_skipped"
"""The skipped-step count in a checkpoint's ``progress`` (``max_non_finite_steps`` counts over
the whole run, across resumes)."""
NO_TARGET_KEY = "no_target_steps"
"""The count of steps without a target token in a checkpoint's ``progress`` (over the run)."""


class TrainingStopped(RuntimeError):
    """The run stopped on purpose: the message says why, at which step, and what to do."""


class NonFiniteError(TrainingStopped):
    """A step's loss or gradient norm was NaN/inf."""


def step_is_finite(loss_sums: Tensor, grad_norm: Tensor) -> Tensor:
    """0-dim bool on the device: every summed loss (``[3]``) and the grad norm are finite."""
    return torch.isfinite(loss_sums).all() & torch.isfinite(grad_norm)


def _finite(record: dict[str, Any], key: str) -> bool:
    value = record.get(key)
    return value is None or math.isfinite(value)


class NonFiniteGuard:
    """The policy of one run (``on_non_finite``, ``max_non_finite_steps``) and its counts.

    ``last_checkpoint`` is the newest checkpoint known to be finite (saved by this run, or the
    one it resumed from); the recipe keeps it current.
    """

    def __init__(self, policy: str, max_skipped: int, skipped: int = 0) -> None:
        self.policy = policy
        self.max_skipped = max_skipped
        self.skipped = skipped  # steps skipped so far in the run (kept across a resume)
        self.no_target_steps = 0  # steps without a target token (no update), over the run
        self.last_checkpoint: Path | None = None
        self.last_checkpoint_step = -1

    def resumed(self, folder: Path | None, progress: dict[str, Any]) -> None:
        """A resumed run: ``folder`` is its checkpoint, ``progress`` the saved counters."""
        self.last_checkpoint, self.last_checkpoint_step = folder, progress["global_step"]
        self.skipped = progress.get(SKIPPED_KEY, 0)
        self.no_target_steps = progress.get(NO_TARGET_KEY, 0)

    def saved(self, folder: Path | None, output_dir: str | Path, step: int) -> None:
        """A checkpoint of ``step`` was saved (rank 0 has its ``folder``, the others None)."""
        self.last_checkpoint = folder or checkpoints_root(output_dir) / step_dirname(step)
        self.last_checkpoint_step = step

    @property
    def skips(self) -> bool:
        return self.policy == "skip"

    @property
    def exhausted(self) -> bool:
        """Policy skip: ``max_non_finite_steps`` steps were skipped (the run must stop)."""
        return self.skips and self.skipped >= self.max_skipped

    def skip_update(self, finite: Tensor) -> bool:
        """Policy skip: True when this step's update must be left out (``finite``: 0-dim bool
        on the device; one host read). Policy stop: always False, with no host read."""
        if not self.skips:
            return False
        skip = not bool(finite)
        self.skipped += skip
        return skip

    def no_target_step(self, step: int) -> str:
        """Count a step without a target token on any rank (its update is left out) and say so."""
        self.no_target_steps += 1
        return (
            f"step {step} has no target token on any rank (every label of its micro-batches is "
            f"ignored): no update, the run goes on ({self.no_target_steps} such step(s) so "
            "far). Usually tokenizer.max_seq_len is shorter than the prompts or the answers "
            "are empty"
        )

    def check_records(self, records: list[dict[str, Any]]) -> None:
        """Raise at the first of ``records`` (``"kind": "train"``, oldest first) that had,
        under policy stop, a non-finite loss or gradient norm; under policy
        skip, once ``max_non_finite_steps`` steps were skipped; at a ``"kind": "val"`` record
        with a non-finite CE (the weights themselves diverged; both policies). Call on every
        rank (the records are the same on every rank)."""
        for record in records:
            step = record["step"]
            if record["kind"] == "val":
                if not _finite(record, "ce"):
                    raise NonFiniteError(
                        f"validation after step {step} gives a non-finite CE ({record['ce']}): "
                        f"the weights diverged; they are not saved; {self._where()}. "
                        "Lower optimizer.lr or set clip_grad_norm"
                    )
                continue
            if record["num_tokens"] == 0:
                continue  # exact zeros; the recipe left out its update (no_target_step)
            finite = all(_finite(record, key) for key in ("loss", "ce_loss", "kd_loss"))
            if not self.skips and not (finite and _finite(record, "grad_norm")):
                raise NonFiniteError(
                    f"step {step}: the loss or the gradient norm is not finite (loss "
                    f"{record['loss']}, grad_norm {record['grad_norm']}); the run stops "
                    f"(on_non_finite: stop) and nothing from step {step} on is saved; "
                    f"{self._where(step)}. Lower optimizer.lr, set clip_grad_norm, or set "
                    "on_non_finite: skip to leave such steps out"
                )
        if self.exhausted:
            raise NonFiniteError(
                f"{self.skipped} steps had a non-finite loss or gradient norm and were skipped "
                f"(max_non_finite_steps = {self.max_skipped}), the last at step "
                f"{records[-1]['step'] if records else '?'}; the run stops; {self._where()}. "
                "Lower optimizer.lr or set clip_grad_norm"
            )

    def check_weights(self, model: nn.Module, step: int) -> None:
        """Before a checkpoint: raise :class:`NonFiniteError` unless every trainable parameter
        is finite (an update can overflow the weights while the step's loss and gradient norm
        were finite). Each rank checks its shards; one all-reduce and one host read, on every
        rank (a collective)."""
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not trainable:
            return
        local = [p.to_local() if isinstance(p, DTensor) else p for _, p in trainable]
        bad = torch.stack([(~torch.isfinite(p.detach())).any() for p in local]).float()
        names = [name for (name, _), count in zip(trainable, all_reduce_sum(bad).tolist()) if count]
        if names:
            raise NonFiniteError(
                f"the weights after step {step} are not finite ({names[0]}"
                f"{f' and {len(names) - 1} more' if len(names) > 1 else ''}): the update of a step "
                f"whose loss and gradient norm were finite overflowed; they are not saved; "
                f"{self._where()}. Lower optimizer.lr or set clip_grad_norm"
            )

    def _where(self, bad_step: int | None = None) -> str:
        """Where to resume from, when step ``bad_step`` (its forward) was the first bad one."""
        if self.last_checkpoint is None:
            return "no checkpoint was saved before it"
        if bad_step is not None and self.last_checkpoint_step == bad_step - 1:
            return (
                f"the last checkpoint, {self.last_checkpoint}, holds the weights this step's "
                "forward started from (finite, but they gave a non-finite loss): resume from an "
                "earlier checkpoint if one is kept (keep_last_n_checkpoints), or from it with a "
                "lower optimizer.lr"
            )
        return f"the last good checkpoint is {self.last_checkpoint}"
