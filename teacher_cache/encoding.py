"""The on-disk encoding of one position's top-k teacher distribution (``TopKCodec``).

A position is stored as two fixed-size rows, in *rank order* (most likely token first):

``ids``: ``ceil(k * b / 8)`` bytes, ``b = ceil(log2 V)`` bits per id (17 for Llama 3's
    128,256), little-endian bit order: bit ``j`` of the ``i``-th id is bit ``i * b + j`` of the
    row. Exact.
``values``: ``M + 1`` float16 numbers: the log-probabilities at ``M`` *knot ranks*
    ``r_0 = 1 < r_1 < ... < r_{M-1} = k``, then the log of the rest mass (the probability
    outside the k ids; ``-inf`` when there is none).

Decoding reads the knots exactly (up to float16 rounding, relative error <= 2**-11) and fills
the ranks between two knots by linear interpolation of the log-probability in ``log(rank)``
(a power law between knots: the shape of a sorted next-token distribution's tail). Both keep
the log-probabilities non-increasing. Last, the k + 1 buckets are renormalised together
(``logsumexp`` subtracted) so the decoded distribution sums to exactly 1; the rest mass is
stored on its own rather than as ``1 - sum``, which would cancel catastrophically when the k
ids hold nearly all the mass.

A -inf knot (a token of probability 0, e.g. a masked vocabulary) makes every rank after the
previous knot -inf. ``value_dtype="float32"`` (4 bytes a value) is there to measure what
float16 costs. With ``k <= M`` every rank is a knot and the encoding is exact up to float16 rounding. The
default ``M = 12`` puts the knots at ranks 1-6, 10, 17, 28, 46, 77 and 128 for k = 128; at V = 128,256 a position takes 272 + 26 = 298 bytes. The measured round-trip error is
in ``tests/test_teacher_cache.py`` and the README.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

DEFAULT_KNOTS = 12
VALUE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def id_bits(vocab_size: int) -> int:
    """Bits per token id: ``ceil(log2 V)`` (at least 1)."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size = {vocab_size}: need a positive vocabulary size")
    return max(1, math.ceil(math.log2(vocab_size)))


def knot_ranks(k: int, num_knots: int) -> list[int]:
    """``min(k, num_knots)`` knot ranks from 1 to k (1-based).

    The first half are the consecutive ranks ``1 .. ceil(M / 2)`` (the head of a sorted
    distribution holds most of the mass and has irregular gaps); the rest are spaced evenly in
    ``log(rank)`` up to k (each the previous times an equal share of the remaining log-distance,
    rounded, and at least one more than the previous).
    """
    if k < 1 or num_knots < 1:
        raise ValueError(f"knot_ranks(k={k}, num_knots={num_knots}): need k, num_knots >= 1")
    if num_knots >= k:
        return list(range(1, k + 1))
    ranks = list(range(1, (num_knots + 1) // 2 + 1))
    while len(ranks) < num_knots:
        previous, left = ranks[-1], num_knots - len(ranks)
        step = (k / previous) ** (1.0 / left)
        # room for the knots still to come: at most k - (left - 1)
        ranks.append(min(max(previous + 1, round(previous * step)), k - (left - 1)))
    return ranks


def pack_ids(ids: Tensor, bits: int) -> Tensor:
    """``[N, k]`` int ids in ``[0, 2**bits)`` -> ``[N, ceil(k * bits / 8)]`` uint8 (bit-packed)."""
    array = ids.to(torch.int64).cpu().numpy()
    shifts = np.arange(bits, dtype=np.int64)
    # [N, k, bits] little-endian bits of every id, flattened per row
    bits_per_row = array.shape[1] * bits
    bit_array = ((array[..., None] >> shifts) & 1).astype(np.uint8).reshape(-1, bits_per_row)
    return torch.from_numpy(np.packbits(bit_array, axis=1, bitorder="little"))


def unpack_ids(packed: Tensor, k: int, bits: int) -> Tensor:
    """Inverse of :func:`pack_ids`: ``[N, bytes]`` uint8 -> ``[N, k]`` int64."""
    array = packed.cpu().numpy()
    bit_array = np.unpackbits(array, axis=1, count=k * bits, bitorder="little")
    weights = (np.int64(1) << np.arange(bits, dtype=np.int64))[None, None, :]
    values = (bit_array.reshape(array.shape[0], k, bits).astype(np.int64) * weights).sum(-1)
    return torch.from_numpy(values)


@dataclass(frozen=True)
class TopKCodec:
    """Encoder/decoder of top-k rows for one ``(k, V, knots)`` setting (see the module doc)."""

    k: int
    vocab_size: int
    num_knots: int = DEFAULT_KNOTS
    value_dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.value_dtype not in VALUE_DTYPES:
            raise ValueError(f"value_dtype = {self.value_dtype!r}: use one of {list(VALUE_DTYPES)}")
        if not 1 <= self.k <= self.vocab_size:
            raise ValueError(
                f"top_k = {self.k} with vocabulary {self.vocab_size}: need 1 <= top_k <= V"
            )
        if self.num_knots < 2 and self.k > 1:
            raise ValueError(f"knots = {self.num_knots}: need at least 2 (ranks 1 and k)")

    @property
    def bits(self) -> int:
        return id_bits(self.vocab_size)

    @property
    def knots(self) -> list[int]:
        return knot_ranks(self.k, self.num_knots)

    @property
    def id_bytes(self) -> int:
        return math.ceil(self.k * self.bits / 8)

    @property
    def num_values(self) -> int:
        """Numbers per position: the knots and the rest mass."""
        return len(self.knots) + 1

    @property
    def bytes_per_position(self) -> int:
        return self.id_bytes + self.dtype.itemsize * self.num_values

    @property
    def dtype(self) -> torch.dtype:
        return VALUE_DTYPES[self.value_dtype]

    def describe(self) -> dict:
        """The encoding as recorded in a cache manifest."""
        return {
            "id_bits": self.bits,
            "knot_ranks": self.knots,
            "value_dtype": self.value_dtype,
            "bytes_per_position": self.bytes_per_position,
        }

    def encode(self, ids: Tensor, logprobs: Tensor, rest_logmass: Tensor) -> tuple[Tensor, Tensor]:
        """Encode N positions.

        Args:
            ids: ``[N, k]`` token ids, in rank order (``logprobs`` non-increasing along k).
            logprobs: ``[N, k]`` log-probabilities of ``ids``.
            rest_logmass: ``[N]`` log of the probability outside the k ids.

        Returns:
            ``(packed_ids [N, id_bytes] uint8, values [N, num_values] value_dtype)``.
        """
        if ids.shape[-1] != self.k or logprobs.shape != ids.shape:
            raise ValueError(f"expected [N, {self.k}] ids and logprobs, got {tuple(ids.shape)}")
        knots = torch.tensor([r - 1 for r in self.knots], device=logprobs.device)
        values = torch.cat([logprobs.float()[:, knots], rest_logmass.float()[:, None]], dim=1)
        # Log-probs below float16's range (never in practice, except -inf) saturate.
        lowest = float(torch.finfo(self.dtype).min)
        values = torch.where(values.isneginf(), values, values.clamp(min=lowest, max=0.0))
        return pack_ids(ids, self.bits), values.to(self.dtype).cpu()

    def decode(self, packed_ids: Tensor, values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Decode N positions: ``(ids [N, k] int64, logprobs [N, k] fp32, rest [N] fp32)``.

        The k + 1 buckets of each row sum to 1 (see the module doc).
        """
        ids = unpack_ids(packed_ids, self.k, self.bits)
        values = values.float()
        knot_values, rest = values[:, :-1], values[:, -1]
        logprobs = _interpolate(knot_values, self.knots, self.k)
        total = torch.logsumexp(torch.cat([logprobs, rest[:, None]], dim=1), dim=1)
        total = torch.where(total.isfinite(), total, torch.zeros_like(total))
        return ids, logprobs - total[:, None], rest - total


def _interpolate(knot_values: Tensor, knots: list[int], k: int) -> Tensor:
    """``[N, M]`` values at 1-based ranks ``knots`` -> ``[N, k]``, linear in ``log(rank)``."""
    if len(knots) == k:
        return knot_values.clone()
    ranks = torch.arange(1, k + 1, dtype=torch.float64)
    knot_tensor = torch.tensor(knots, dtype=torch.float64)
    # segment s covers ranks (knots[s], knots[s + 1]]
    upper = torch.searchsorted(knot_tensor, ranks).clamp(min=1, max=len(knots) - 1)
    lower = upper - 1
    log_r, log_lo, log_hi = ranks.log(), knot_tensor[lower].log(), knot_tensor[upper].log()
    weight = ((log_r - log_lo) / (log_hi - log_lo)).float()  # [k] in [0, 1]
    low, high = knot_values[:, lower], knot_values[:, upper]
    out = low + weight * (high - low)
    # -inf at a knot: -inf - -inf is nan; everything past a -inf knot is -inf (non-increasing)
    out = torch.where(out.isnan(), torch.full_like(out, -math.inf), out)
    out[:, [r - 1 for r in knots]] = knot_values
    return out
