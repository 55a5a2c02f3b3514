"""A cached sample's rows: joined to a training batch by its ``sample_index``.

The cache stores rows per *sample index* (the position of the sample in the tokenised training
dataset), so training finds a batch's teacher rows whatever the shuffling, the process count
or the resume point. A sample's rows are its *target positions*: the positions ``t`` whose
shifted label (the token at ``t + 1``) is not ``ignore_index``, in order; that is exactly
where the losses are summed. (The training loader's batches carry ``sample_index``:
:class:`kdtune.training.data.IndexedDataset`.)
"""

from __future__ import annotations

import zlib

import numpy as np
from torch import Tensor


def target_positions(shifted_labels: Tensor, ignore_index: int) -> Tensor:
    """``[S]`` shifted labels of one sample -> int64 positions of its targets, ascending."""
    return (shifted_labels != ignore_index).nonzero().flatten()


def row_fingerprint(shifted_labels: Tensor, ignore_index: int) -> int:
    """A checksum of where a sample's targets are and what they are (crc32 of both).

    Stored per sample in the cache and recomputed from every training batch: a cache built
    from other data (or another tokenisation) cannot be joined to it silently.
    """
    positions = target_positions(shifted_labels, ignore_index)
    targets = shifted_labels[positions]
    payload = np.concatenate([positions.cpu().numpy(), targets.cpu().numpy()]).astype(np.int64)
    return zlib.crc32(payload.tobytes())
