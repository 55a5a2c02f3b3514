"""On-policy sequences: prompts from a dataset, batched KV-cache sampling, training batches.

On-policy distillation (GKD, Agarwal et al. 2024) trains the student on sequences it samples
itself: for each prompt the student (eval mode, no gradient) generates a completion, then the
student (train mode) and the teacher score ``prompt + completion`` in one forward pass, and the
loss covers only the generated tokens. This module holds the pieces that do not depend on the
recipe:

- :func:`prompt_tokens`: the prompt of a torchtune ``SFTDataset`` sample, i.e. the sample's
  conversation with the assistant's answer removed, tokenised up to and including the
  assistant header (the answer may be empty: prompt-only records are valid here).
- :func:`generate`: batched sampling with a KV cache (:mod:`~kdtune.training.decode_attention`:
  attention over the filled positions only, no per-head copy of the cache), left-padded
  prompts, per-row stop at a stop token, temperature / top-k / top-p. Each row draws its noise
  from its own generator, seeded by :func:`row_seed` from the run seed, the optimizer step and
  the sample's dataset index, so a row's completion does not depend on the other rows of its
  batch, on the number of processes, or on where a run was resumed.
- :func:`completion_batch`: ``prompt + completion`` rows right-padded into the recipe's batch
  format, labels set on the generated tokens only.
- :func:`is_on_policy_step`: which optimizer steps are on-policy for a fraction ``lambda``.

Several processes (FSDP2) decode in lockstep: every rank runs the same number of decode steps
(``all_finished`` reduces the per-rank "every row stopped" flag across ranks), because a
sharded model's forward is a collective.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torchtune.data import Message
from torchtune.generation import get_causal_mask_from_padding_mask

from kdtune.training.decode_attention import filled_cache_attention
from kdtune.training.lm_head import last_position_logits


@dataclass(frozen=True)
class SamplingOptions:
    """How completions are sampled.

    Attributes:
        max_new_tokens: most tokens generated per prompt (a stop token counts).
        temperature: divides the logits before sampling; 0 means greedy.
        top_k: keep only the ``top_k`` most likely tokens (None: all).
        top_p: keep the smallest set of most likely tokens whose mass reaches ``top_p``
            (nucleus sampling; None or 1.0: all).
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"on_policy.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"on_policy.temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"on_policy.top_k must be >= 1 or null, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"on_policy.top_p must be in (0, 1] or null, got {self.top_p}")


# ------------------------------------------------------------------------------------------------
# Prompts


def _conversation_without_answer(messages: list[Message]) -> list[Message]:
    """The messages with the final assistant turn emptied (or an empty one appended)."""
    if messages and messages[-1].role == "assistant":
        messages = messages[:-1]
    return [*messages, Message(role="assistant", content="", masked=False)]


def has_answer(dataset: Any, index: int) -> bool:
    """Whether sample ``index`` of a torchtune ``SFTDataset`` ends with a non-empty answer."""
    messages = _messages(dataset, index)
    return bool(messages) and messages[-1].role == "assistant" and bool(messages[-1].text_content)


def check_prompt_dataset(dataset: Any, *, key: str = "dataset") -> None:
    """Raise unless ``dataset`` can give prompts: a torchtune ``SFTDataset`` (its records go
    through a message transform, then the model tokenizer)."""
    if not all(
        hasattr(dataset, name) for name in ("_message_transform", "_model_transform", "_data")
    ):
        raise ValueError(
            f"{key}: on-policy steps (on_policy.fraction > 0) need a torchtune SFTDataset "
            f"(instruct_dataset, chat_dataset, alpaca_dataset, ...) to read prompts from, got "
            f"{type(dataset).__name__}: use such a dataset (unpacked, not concatenated) or set "
            "on_policy: null"
        )


def check_prompt_tokenizer(tokenizer: Any) -> None:
    """Raise unless ``tokenizer`` has what sampling needs: ``stop_tokens`` and ``pad_id``."""
    stops = getattr(tokenizer, "stop_tokens", None)
    if not stops or not isinstance(getattr(tokenizer, "pad_id", None), int):
        raise ValueError(
            f"tokenizer: on-policy sampling needs the tokenizer's stop_tokens (ids that end a "
            f"completion) and pad_id, but {type(tokenizer).__name__} has stop_tokens="
            f"{stops!r}, pad_id={getattr(tokenizer, 'pad_id', None)!r}: give the tokenizer "
            "class both attributes, or set on_policy: null"
        )


def _messages(dataset: Any, index: int) -> list[Message]:
    check_prompt_dataset(dataset)
    return list(dataset._message_transform(dataset._data[index])["messages"])


def prompt_tokens(dataset: Any, index: int) -> list[int]:
    """The prompt of sample ``index``: its conversation up to the assistant header, as ids.

    The same tokenizer (the dataset's model transform) that tokenises training samples
    tokenises the conversation with the answer removed and no end tokens, so the prompt is
    exactly the prefix an off-policy sample of the same record starts with.
    """
    messages = _conversation_without_answer(_messages(dataset, index))
    tokenizer = dataset._model_transform
    tokens, _ = tokenizer.tokenize_messages(messages, add_end_tokens=False)
    return list(tokens)


# ------------------------------------------------------------------------------------------------
# Sampling


def row_seed(seed: int, step: int, sample_index: int) -> int:
    """A 63-bit seed for one row's sampling noise, from (run seed, optimizer step, sample)."""
    digest = hashlib.sha256(f"kdtune-on-policy:{seed}:{step}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def is_on_policy_step(step: int, fraction: float) -> bool:
    """Whether optimizer step ``step`` (0-based) samples its sequences from the student.

    Deterministic and evenly spread: after any ``n`` steps, ``floor(n * fraction)`` were
    on-policy. ``fraction`` 0 never, 1 always.
    """
    return math.floor((step + 1) * fraction) > math.floor(step * fraction)


def filter_logits(logits: Tensor, options: SamplingOptions) -> Tensor:
    """Tempered logits with the tokens outside top-k / top-p set to ``-inf``. ``[B, V]``."""
    logits = logits / options.temperature
    if options.top_k is not None and options.top_k < logits.shape[-1]:
        kth = torch.topk(logits, options.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if options.top_p is not None and options.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        mass_before = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1)
        drop_sorted = mass_before >= options.top_p  # the first token is always kept
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -math.inf)
    return logits


def sample_next(logits: Tensor, options: SamplingOptions, noise: Tensor | None) -> Tensor:
    """Next token per row. ``logits [B, V]`` fp32, ``noise [B, V]`` Exp(1) draws -> ``[B]``.

    Sampling uses the exponential-race trick: ``argmax(p / noise)`` is a draw from ``p``.
    """
    if options.temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits, options).softmax(-1)
    return (probs / noise).argmax(-1)


def _noise(generators: list[torch.Generator], vocab: int, device: torch.device) -> Tensor:
    """One ``[V]`` row of Exp(1) noise per generator: ``[B, V]`` fp32."""
    return torch.stack(
        [
            torch.empty(vocab, device=device).exponential_(1.0, generator=generator)
            for generator in generators
        ]
    )


def _last_position_logits(model: nn.Module, tokens: Tensor, **kwargs: Any) -> Tensor:
    """fp32 logits of the last position, ``[B, V]``, whatever the model's chunked-output mode
    (only the last position is projected, as a 2-D matrix)."""
    return last_position_logits(model, tokens, **kwargs).float()


def _left_padded(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> Tensor:
    width = max(len(p) for p in prompts)
    rows = [[pad_id] * (width - len(p)) + list(p) for p in prompts]
    return torch.tensor(rows, dtype=torch.long, device=device)


def local_rows_finished(finished: Tensor) -> bool:
    """``all_finished`` for one process: stop once every row of this batch has stopped."""
    return bool(finished.all())


@dataclass(frozen=True)
class Completions:
    """What :func:`generate` returns, one entry per prompt.

    Attributes:
        tokens: the generated ids, ending with a stop id unless cut at ``max_new_tokens``.
        logprobs: the model's log-probability of each generated id at temperature 1 (its raw
            distribution, before temperature / top-k / top-p), as fp32 values.
    """

    tokens: list[list[int]]
    logprobs: list[list[float]]


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    options: SamplingOptions,
    *,
    seeds: Sequence[int],
    stop_ids: Sequence[int],
    pad_id: int,
    cache_dtype: torch.dtype,
    all_finished: Callable[[Tensor], bool] = local_rows_finished,
) -> Completions:
    """Sample a completion for each prompt with a KV cache.

    Args:
        model: a torchtune ``TransformerDecoder`` without caches set up; the caller puts it in
            eval mode. Its chunked-output setting does not matter.
        prompts: ``B`` lists of token ids (any lengths >= 1).
        options: sampling settings.
        seeds: one seed per row (:func:`row_seed`); row ``i``'s tokens depend only on its prompt
            and ``seeds[i]``.
        stop_ids: a row stops after emitting one of these (the stop token is kept).
        pad_id: fills the left padding of the prompts (masked out of attention).
        cache_dtype: dtype of the KV cache (the model's dtype).
        all_finished: called once per decode step with the ``[B]`` bool "row stopped" tensor;
            returns True when decoding may end. Several processes pass a function that agrees
            across ranks, so they run the same number of decode steps.

    Returns:
        :class:`Completions` for the ``B`` prompts.
    """
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = next(model.parameters()).device
    batch = len(prompts)
    prompt = _left_padded(prompts, pad_id, device)  # [B, P]
    width = prompt.shape[1]
    total = width + options.max_new_tokens
    limit = getattr(model, "max_seq_len", None)
    if limit is not None and total > limit:
        raise ValueError(
            f"a prompt of {width} tokens plus on_policy.max_new_tokens="
            f"{options.max_new_tokens} exceeds the model's max_seq_len {limit}: lower "
            "max_new_tokens or the tokenizer's max_seq_len"
        )
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    # Real tokens are the last len(p) of each row; the mask and positions ignore the padding.
    is_token = torch.arange(width, device=device)[None, :] >= (width - lengths)[:, None]
    is_token = torch.nn.functional.pad(is_token, (0, options.max_new_tokens), value=True)
    masks = get_causal_mask_from_padding_mask(is_token, target_seq_len=total)  # [B, T, T]
    # additive (0 / -inf) in the cache's dtype, made once: every layer's attention uses it as is
    masks = torch.zeros(masks.shape, dtype=cache_dtype, device=device).masked_fill_(
        ~masks, -math.inf
    )
    positions = (is_token.cumsum(-1) - 1).clamp(min=0)  # [B, T]
    generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
    stops = torch.tensor(list(stop_ids), device=device)

    completions = torch.full((batch, options.max_new_tokens), pad_id, device=device)
    logprobs = torch.zeros(batch, options.max_new_tokens, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    with filled_cache_attention(model, batch, total, cache_dtype):
        logits = _last_position_logits(
            model, prompt, input_pos=positions[:, :width], mask=masks[:, :width]
        )
        for step in range(options.max_new_tokens):
            noise = (
                None if options.temperature == 0 else _noise(generators, logits.shape[-1], device)
            )
            token = sample_next(logits, options, noise)
            token = torch.where(finished, torch.full_like(token, pad_id), token)
            completions[:, step] = token
            # log-softmax at the drawn token only: its logit minus the row's logsumexp
            picked = logits.gather(-1, token[:, None]).squeeze(-1)
            logprobs[:, step] = picked - logits.logsumexp(-1)
            finished |= torch.isin(token, stops)
            if step + 1 == options.max_new_tokens or all_finished(finished):
                break
            at = width + step
            logits = _last_position_logits(
                model,
                token[:, None],
                input_pos=positions[:, at : at + 1],
                mask=masks[:, at : at + 1],
            )
    stop_set = set(stop_ids)
    tokens = [_cut_at_stop(row, stop_set) for row in completions.tolist()]
    values = [row[: len(kept)] for row, kept in zip(logprobs.tolist(), tokens)]
    return Completions(tokens, values)


def _cut_at_stop(row: list[int], stop_ids: set[int]) -> list[int]:
    """``row`` up to and including its first stop id."""
    for i, token in enumerate(row):
        if token in stop_ids:
            return row[: i + 1]
    return row


# ------------------------------------------------------------------------------------------------
# Training batches


def completion_batch(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    *,
    pad_id: int,
    ignore_index: int,
) -> dict[str, Tensor]:
    """``prompt + completion`` rows for the loss, in the recipe's (unshifted) batch format.

    Returns ``{"tokens": [B, S], "labels": [B, S]}`` right-padded to the longest row, with
    ``labels`` equal to ``tokens`` on the completion tokens and ``ignore_index`` elsewhere
    (prompt and padding), exactly as an SFT sample labels its answer.
    """
    rows = [list(p) + list(c) for p, c in zip(prompts, completions)]
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), ignore_index, dtype=torch.long)
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        tokens[i, : len(rows[i])] = torch.tensor(rows[i], dtype=torch.long)
        if completion:
            labels[i, len(prompt) : len(rows[i])] = torch.tensor(list(completion))
    return {"tokens": tokens, "labels": labels}
