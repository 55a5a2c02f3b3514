"""Held-out metrics of a model on the demo task, at every position whose truth is known.

A *task position* is a position of an answer whose next token is an answer word or the
``<|eot_id|>`` that ends it (the chain's end state). Its true next-token distribution is a row of
the chain (:mod:`kdtune.demo.task`) placed on the word tokens (:class:`WordTokens`). Per task
position, for a model with next-token distribution ``q``:

- ``ce``: ``-log q(observed token)``, the loss against the data (perplexity is ``exp`` of its
  mean); its expectation is the truth's entropy plus ``true_kl``, so the entropy is the floor.
- ``true_kl``: ``KL(truth || q)``, exact (the truth is known, no sampling noise per position).
- ``teacher_kl``: ``KL(teacher || q)``, the quantity forward-KL distillation minimises.
- ``top1``: whether ``argmax q`` is the most likely true next token.

All are means over task positions (each answer token counts once).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from kdtune.demo.task import ChainTask
from kdtune.demo.tokenizer import WordTokens

METRIC_NAMES: tuple[str, ...] = ("ce", "ppl", "true_kl", "teacher_kl", "top1")


def true_next_token_probs(
    task: ChainTask, tokens: WordTokens, start: int, output: list[int], vocab_size: int
) -> Tensor:
    """True next-token distributions at the task positions of one answer.

    Position ``k`` predicts answer token ``k`` (``len(output)`` words, then the end token).
    Returns float64 ``[len(output) + 1, vocab_size]``, each row summing to 1.
    """
    probs = torch.zeros(len(output) + 1, vocab_size, dtype=torch.float64)
    probs[0, list(tokens.first)] = torch.tensor(task.first_step_probs(start), dtype=torch.float64)
    later_ids = [*tokens.later, tokens.end]
    for k, word in enumerate(output, start=1):
        probs[k, later_ids] = torch.tensor(task.next_step_probs(word), dtype=torch.float64)
    return probs


def kl_per_row(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(p || q)`` per row from log-probabilities ``[N, V]`` -> ``[N]``; ``0 log 0 = 0``."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(dim=-1)


@dataclass
class MetricSums:
    """Running sums over task positions; :meth:`means` turns them into the table's numbers."""

    positions: int = 0
    ce: float = 0.0
    true_kl: float = 0.0
    teacher_kl: float = 0.0
    top1: float = 0.0
    has_teacher: bool = field(default=True)

    def add(
        self,
        logits: Tensor,
        true_probs: Tensor,
        targets: Tensor,
        teacher_logits: Tensor | None,
    ) -> None:
        """Add ``N`` task positions.

        Args:
            logits: ``[N, V]`` the model's next-token logits (any float dtype; computed in fp64).
            true_probs: ``[N, V]`` the true next-token distributions.
            targets: ``[N]`` the observed next tokens.
            teacher_logits: ``[N, V]`` the teacher's logits, or None (``teacher_kl`` is then NaN).
        """
        log_q = F.log_softmax(logits.double(), dim=-1)
        log_truth = true_probs.double().log()
        self.positions += logits.shape[0]
        self.ce += -log_q.gather(1, targets[:, None]).sum().item()
        self.true_kl += kl_per_row(log_truth, log_q).sum().item()
        self.top1 += (logits.argmax(-1) == true_probs.argmax(-1)).sum().item()
        if teacher_logits is None:
            self.has_teacher = False
        else:
            log_p = F.log_softmax(teacher_logits.double(), dim=-1)
            self.teacher_kl += kl_per_row(log_p, log_q).sum().item()

    def means(self) -> dict[str, float]:
        if self.positions == 0:
            raise ValueError("no task positions were evaluated (empty held-out set?)")
        n = self.positions
        return {
            "ce": self.ce / n,
            "ppl": math.exp(self.ce / n),
            "true_kl": self.true_kl / n,
            "teacher_kl": self.teacher_kl / n if self.has_teacher else math.nan,
            "top1": self.top1 / n,
        }


def truth_entropy(true_probs: Tensor) -> Tensor:
    """Entropy per row of ``[N, V]`` distributions, ``[N]``: the floor of the expected CE."""
    log_p = true_probs.double().log()
    return -torch.where(true_probs > 0, true_probs * log_p, torch.zeros_like(log_p)).sum(-1)


# ------------------------------------------------------------------------------------------------
# Sample-based metrics: how good the model's *own* answers are under the true chain.
#
# Teacher-forced metrics above score the model on the data's prefixes. At inference the model
# conditions on its own prefixes; on-policy distillation trains for exactly that. For each
# held-out prompt one answer is sampled from the model at temperature 1, then:
#
# - ``sample_true_ll``: the true log-likelihood per token of the model's own answers (the end
#   token included), i.e. ``sum_t log p_true(y_t | x, y_<t) / number of tokens``; higher is
#   better, and the truth's own samples score minus its entropy rate.
# - ``sample_reverse_kl``: the sequence-level reverse KL to the truth, estimated from the same
#   samples: mean over answers of ``log q(y | x) - log p_true(y | x)``; lower is better.
#
# A token the truth can never produce (not a successor of the previous word, a non-word token,
# anything after such a token) has true probability 0, which would make both numbers infinite for
# every model that ever makes a mistake. The truth is therefore smoothed:
# ``p_eps = (1 - eps) * p_true + eps / V`` with ``eps = SMOOTHING`` (an impossible token costs
# ``log(eps / V)``, about -12.9 nats at V = 384). ``sample_valid`` reports the share of answers
# the unsmoothed truth could have produced (ending with the end token within the length cap).

SMOOTHING = 1e-3
SAMPLE_METRIC_NAMES: tuple[str, ...] = ("sample_true_ll", "sample_reverse_kl", "sample_valid")


def true_token_logprobs(
    task: ChainTask, tokens: WordTokens, start: int, answer: list[int], vocab_size: int
) -> tuple[list[float], bool]:
    """Smoothed true log-probabilities of the tokens of one sampled ``answer`` (token ids).

    Returns ``(log-probs up to and including the first end token, valid)``, ``valid`` when the
    unsmoothed truth gives every token a positive probability and the answer ends.
    """
    first = dict(zip(tokens.first, range(task.num_words)))
    later = dict(zip(tokens.later, range(task.num_words)))
    floor = SMOOTHING / vocab_size
    out: list[float] = []
    valid = False
    word: int | None = start
    for position, token in enumerate(answer):
        p = 0.0
        if word is not None:
            if position == 0:
                probs = task.first_step_probs(start)
                nxt = first.get(token)
            else:
                probs = task.next_step_probs(word)
                nxt = task.num_words if token == tokens.end else later.get(token)
            p = probs[nxt] if nxt is not None else 0.0
            word = nxt if nxt is not None and nxt < task.num_words and p > 0 else None
        out.append(math.log((1.0 - SMOOTHING) * p + floor))
        if token == tokens.end:
            valid = p > 0 and all(x > math.log(floor) for x in out)
            break
    return out, valid


@dataclass
class SampleSums:
    """Running sums over sampled answers; :meth:`means` gives the sample-based metrics."""

    answers: int = 0
    tokens: int = 0
    true_ll: float = 0.0
    reverse_kl: float = 0.0
    valid: int = 0

    def add(self, model_logprob: float, true_logprobs: list[float], valid: bool) -> None:
        """One answer: the model's log q(y|x), the smoothed true log-probs of its tokens."""
        self.answers += 1
        self.tokens += len(true_logprobs)
        self.true_ll += sum(true_logprobs)
        self.reverse_kl += model_logprob - sum(true_logprobs)
        self.valid += int(valid)

    def means(self) -> dict[str, float]:
        if self.answers == 0:
            raise ValueError("no answers were sampled (empty held-out set?)")
        return {
            "sample_true_ll": self.true_ll / self.tokens,
            "sample_reverse_kl": self.reverse_kl / self.answers,
            "sample_valid": self.valid / self.answers,
        }
