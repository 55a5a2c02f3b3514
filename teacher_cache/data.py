"""Sample identity: the dataset yields each sample's index and the batch carries it.

The cache stores rows per *sample index* (the position of the sample in the tokenised training
dataset), so training finds a batch's teacher rows whatever the shuffling, the process count
or the resume point. A sample's rows are its *target positions*: the positions ``t`` whose
shifted label (the token at ``t + 1``) is not ``ignore_index``, in order; that is exactly
where the losses are summed.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

SAMPLE_INDEX = "sample_index"


class IndexedDataset(Dataset):
    """``dataset[i]`` plus ``"sample_index": i``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.dataset[index], SAMPLE_INDEX: index}


def collate_with_sample_index(
    collate: Callable[[list[dict[str, Any]]], dict[str, Tensor]],
) -> Callable[[list[dict[str, Any]]], dict[str, Tensor]]:
    """Wrap a collate function: the batch gains ``"sample_index"``, an int64 ``[B]`` tensor,
    when the samples carry one (:class:`IndexedDataset`); other samples collate as before."""

    def collate_fn(samples: list[dict[str, Any]]) -> dict[str, Tensor]:
        batch = collate([{k: v for k, v in s.items() if k != SAMPLE_INDEX} for s in samples])
        if samples and SAMPLE_INDEX in samples[0]:
            indices = [s[SAMPLE_INDEX] for s in samples]
            batch[SAMPLE_INDEX] = torch.tensor(indices, dtype=torch.int64)
        return batch

    return collate_fn


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
