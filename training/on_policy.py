"""On-policy distillation steps: the student (or the teacher) writes the step's sequences.

The recipe's ``on_policy`` config block::

    on_policy:
      fraction: 1.0        # lambda: share of optimizer steps that are on-policy (0 = off-policy)
      max_new_tokens: 64
      temperature: 1.0     # sampling temperature (0 = greedy)
      top_k: null
      top_p: null
      source: student      # student: on-policy KD (GKD); teacher: sequence-level KD

On an on-policy step (:func:`kdtune.training.generation.is_on_policy_step`) each micro-batch
is replaced by :class:`Rollout`: the prompts of its samples (looked up by ``sample_index``),
completed by the source model in eval mode without gradients, then labelled on the generated
tokens only. The recipe's ordinary loss step follows: the student (train mode) and the teacher
score ``prompt + completion`` in one pass each, and every divergence, the chunked and the fused
losses, gradient accumulation and FSDP2 work unchanged.

Sampling noise is a pure function of ``(seed, optimizer step, sample index)``
(:func:`~kdtune.training.generation.row_seed`), so an on-policy step needs no random state
beyond what a checkpoint already restores: a resumed run samples exactly what the uninterrupted
run sampled, and a sample gets the same completion on whichever rank reads it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from kdtune.training.config.schema import block_problems, block_values
from kdtune.training.generation import (
    SamplingOptions,
    check_prompt_dataset,
    check_prompt_tokenizer,
    completion_batch,
    generate,
    has_answer,
    is_on_policy_step,
    prompt_tokens,
    row_seed,
)
from kdtune.training.process_group import all_reduce_sum

SAMPLE_INDEX = "sample_index"


@dataclass(frozen=True)
class OnPolicySettings:
    """The ``on_policy`` block, checked. ``fraction`` is lambda in (0, 1]."""

    fraction: float
    sampling: SamplingOptions
    source: str


def on_policy_settings(node: DictConfig | dict | None) -> OnPolicySettings | None:
    """Parse and check the ``on_policy`` block; None when absent or ``fraction`` is 0.

    The keys, their defaults and ranges are the schema's
    (:class:`kdtune.training.config.schema.OnPolicyConfig`).

    Raises:
        ValueError: naming each ``on_policy.<key>`` at fault and the accepted values.
    """
    if node is None:
        return None
    problems = block_problems("on_policy", node)
    if problems:
        raise ValueError("; ".join(message for _, message in problems))
    values = block_values("on_policy", node)
    if values["fraction"] == 0.0:
        return None
    sampling = SamplingOptions(
        max_new_tokens=values["max_new_tokens"],
        temperature=float(values["temperature"]),
        top_k=values["top_k"],
        top_p=None if values["top_p"] is None else float(values["top_p"]),
    )
    return OnPolicySettings(float(values["fraction"]), sampling, values["source"])


def sft_dataset(dataset: Any) -> Any:
    """The torchtune ``SFTDataset`` under wrappers that keep it as ``.dataset``."""
    while not hasattr(dataset, "_message_transform") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    return dataset


def check_answers(dataset: Any, settings: OnPolicySettings, *, key: str = "dataset") -> None:
    """Off-policy steps train on answers: with ``fraction < 1`` every record needs one.

    Prompt-only records (an empty answer, or a conversation without an assistant turn) are
    fine when every step is on-policy (``fraction: 1``).
    """
    if settings.fraction >= 1.0:
        return
    base = sft_dataset(dataset)
    missing = [i for i in range(len(base)) if not has_answer(base, i)]
    if missing:
        raise ValueError(
            f"{key} has {len(missing)} record(s) without an answer (first: "
            f"{missing[:5]}), but on_policy.fraction={settings.fraction} leaves off-policy "
            "steps that train on answers: give every record an answer, or set "
            "on_policy.fraction: 1.0 to train on prompts only"
        )


def check_can_sample(dataset: Any, tokenizer: Any, *, key: str = "dataset") -> None:
    """On-policy steps read prompts from ``dataset`` and stop sampling at the tokenizer's
    stop tokens: raise (naming ``key`` or ``tokenizer`` and the fix) if either cannot."""
    check_prompt_dataset(sft_dataset(dataset), key=key)
    check_prompt_tokenizer(tokenizer)


def _lockstep_finished(finished: Tensor) -> bool:
    """True once every row on every rank has stopped (one all-reduce per decode step)."""
    running = (~finished.all()).to(torch.int32).reshape(1)  # 1 while this rank has rows left
    return not bool(all_reduce_sum(running).item())


class Rollout:
    """Turns an optimizer step's micro-batches into on-policy ones.

    Args:
        settings: the checked ``on_policy`` block.
        dataset: the training dataset (a torchtune ``SFTDataset``, possibly wrapped) whose
            samples the batches' ``sample_index`` values point at.
        tokenizer: the recipe's model tokenizer (stop tokens and padding id).
        seed: the run seed.
        ignore_index: the label value of positions that carry no loss.
        cache_dtype: the KV cache's dtype (the models' compute dtype).
    """

    def __init__(
        self,
        settings: OnPolicySettings,
        dataset: Any,
        tokenizer: Any,
        *,
        seed: int,
        ignore_index: int,
        cache_dtype: torch.dtype,
    ) -> None:
        self.settings = settings
        self._dataset = sft_dataset(dataset)
        check_prompt_dataset(self._dataset)
        check_prompt_tokenizer(tokenizer)
        self._stop_ids = list(tokenizer.stop_tokens)
        self._pad_id = tokenizer.pad_id
        self._seed = seed
        self._ignore_index = ignore_index
        self._cache_dtype = cache_dtype
        self._prompts: dict[int, list[int]] = {}

    def prompt(self, sample_index: int) -> list[int]:
        """The prompt tokens of a sample (tokenised once, then remembered)."""
        if sample_index not in self._prompts:
            self._prompts[sample_index] = prompt_tokens(self._dataset, sample_index)
        return self._prompts[sample_index]

    def step(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        micro_batches: list[dict[str, Tensor]],
        step: int,
    ) -> tuple[list[dict[str, Tensor]], dict[str, float]]:
        """Optimizer step ``step`` (0-based): its micro-batches, sampled by the configured
        source when the step is on-policy (else unchanged), and the generation record fields
        (empty off-policy): ``generated_tokens`` (all ranks), ``mean_generated_length``,
        ``generation_seconds``, ``generation_tokens_per_second``."""
        if not is_on_policy_step(step, self.settings.fraction):
            return micro_batches, {}
        source = student if self.settings.source == "student" else teacher
        if source is None:
            raise ValueError("on_policy.source = teacher needs a teacher_model")
        rolled, local = self(source, micro_batches, step)
        counts = all_reduce_sum(torch.tensor([local["generated_tokens"], local["generated_rows"]]))
        tokens, rows = counts.tolist()
        seconds = local["generation_seconds"]
        return rolled, {
            "generated_tokens": tokens,
            "mean_generated_length": tokens / max(rows, 1.0),
            "generation_seconds": seconds,
            "generation_tokens_per_second": tokens / max(seconds, 1e-9),
        }

    def __call__(
        self, model: nn.Module, micro_batches: list[dict[str, Tensor]], step: int
    ) -> tuple[list[dict[str, Tensor]], dict[str, float]]:
        """Sample completions for every micro-batch's prompts with ``model``.

        Returns the new micro-batches (``tokens``, ``labels`` ``[B, S]`` on the CPU and
        ``sample_index``) and this rank's generation statistics: ``generated_tokens``,
        ``generated_rows`` and ``generation_seconds``.
        """
        started = time.perf_counter()
        was_training = model.training
        model.eval()
        rolled, tokens, rows = [], 0, 0
        try:
            for batch in micro_batches:
                if SAMPLE_INDEX not in batch:
                    raise ValueError(
                        "on-policy steps need each batch's sample_index (the recipe's data "
                        "loader adds it); this batch has only " + ", ".join(batch)
                    )
                indices = batch[SAMPLE_INDEX].tolist()
                prompts = [self.prompt(i) for i in indices]
                completions = generate(
                    model,
                    prompts,
                    self.settings.sampling,
                    seeds=[row_seed(self._seed, step, i) for i in indices],
                    stop_ids=self._stop_ids,
                    pad_id=self._pad_id,
                    cache_dtype=self._cache_dtype,
                    all_finished=_lockstep_finished,
                )
                new = completion_batch(
                    prompts,
                    completions.tokens,
                    pad_id=self._pad_id,
                    ignore_index=self._ignore_index,
                )
                new[SAMPLE_INDEX] = batch[SAMPLE_INDEX]
                rolled.append(new)
                tokens += sum(len(c) for c in completions.tokens)
                rows += len(indices)
        finally:
            model.train(was_training)
        stats = {
            "generated_tokens": float(tokens),
            "generated_rows": float(rows),
            "generation_seconds": time.perf_counter() - started,
        }
        return rolled, stats


def on_policy_rollout(
    cfg: DictConfig, dataset: Any, tokenizer: Any, seed: int, ignore_index: int
) -> Rollout | None:
    """The recipe's :class:`Rollout` for ``cfg.on_policy`` (None when off-policy only), after
    checking that off-policy steps, if any, find an answer in every record."""
    settings = on_policy_settings(cfg.get("on_policy"))
    if settings is None:
        return None
    check_answers(dataset, settings)
    dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
    return Rollout(
        settings, dataset, tokenizer, seed=seed, ignore_index=ignore_index, cache_dtype=dtype
    )
