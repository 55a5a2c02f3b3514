"""The sparse teacher view shared with the losses (``TopKTeacher``), and how it is computed.

``TopKTeacher`` is defined by the loss engine (``kdtune.losses``, see the top-k contract);
:func:`topk_logprobs` is the single definition of what the cache stores for one position.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kdtune.losses import TopKTeacher

__all__ = ["TopKTeacher", "topk_logprobs"]


def topk_logprobs(logits: Tensor, k: int, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """The teacher's k most likely tokens at temperature T, and the log of the rest mass.

    Args:
        logits: ``[N, V]`` teacher logits (any float dtype; computed in fp32).
        k: ids kept per position (``1 <= k <= V``).
        temperature: ``softmax(logits / T)``.

    Returns:
        ``(ids [N, k] int64, logprobs [N, k] fp32, rest_logmass [N] fp32)``, ids in rank order
        (most likely first). The rest is a ``logsumexp`` over the other V - k log-probs, not
        ``log(1 - sum)`` (which cancels when the k ids hold almost all the mass); ``-inf`` for
        k = V.
    """
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
    top = logprobs.topk(k, dim=-1, sorted=True)
    others = logprobs.scatter(-1, top.indices, -math.inf)
    return top.indices, top.values, torch.logsumexp(others, dim=-1)
