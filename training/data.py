"""Datasets, batch collation and the label bookkeeping of the loss.

The loader (:func:`kdtune.training.distributed.build_dataloader`) is torchdata's
``StatefulDataLoader`` over a ``StatefulDistributedSampler`` even in one process, so a
checkpoint records the exact position inside an epoch and the same code serves data-parallel
runs: rank ``r`` of ``W`` reads every ``W``-th sample of the epoch's permutation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig
from torch import Tensor
from torch.utils.data import Dataset
from torchtune import config
from torchtune.data import padded_collate_sft
from torchtune.datasets import ConcatDataset

Batch = dict[str, Tensor]


def build_dataset(cfg_dataset: DictConfig | ListConfig, tokenizer: Any) -> Dataset:
    """One dataset node, or a list of them concatenated (torchtune's convention)."""
    if isinstance(cfg_dataset, ListConfig):
        return ConcatDataset([config.instantiate(node, tokenizer) for node in cfg_dataset])
    return config.instantiate(cfg_dataset, tokenizer)


def sft_collate(pad_id: int, ignore_index: int) -> Callable[[list[dict[str, Any]]], Batch]:
    """Samples -> ``{"tokens": [B, S], "labels": [B, S]}``, right-padded to the longest sample.

    ``tokens`` are padded with ``pad_id``, ``labels`` with ``ignore_index``. The loader itself is
    :func:`kdtune.training.distributed.build_dataloader` (this rank's share of the seeded,
    per-epoch shuffled dataset, resumable mid-epoch).
    """
    return partial(padded_collate_sft, padding_idx=pad_id, ignore_idx=ignore_index)


def shift_labels(labels: Tensor, ignore_index: int) -> Tensor:
    """Targets aligned with the logits: position ``t`` predicts token ``t + 1``.

    ``labels[:, 1:]`` followed by one ``ignore_index`` column, so the logits need no slicing.
    ``[B, S] -> [B, S]``.
    """
    pad = torch.full_like(labels[:, :1], ignore_index)
    return torch.cat([labels[:, 1:], pad], dim=1)


def count_loss_tokens(shifted_labels: list[Tensor], ignore_index: int) -> Tensor:
    """Number of positions that contribute to the loss across micro-batches (int64 scalar).

    Counted on the *shifted* labels, i.e. exactly the positions the losses sum over.
    """
    total = torch.zeros((), dtype=torch.int64, device=shifted_labels[0].device)
    for labels in shifted_labels:
        total += (labels != ignore_index).sum()
    return total


def next_micro_batches(batches: Iterator[Batch], count: int) -> list[Batch] | None:
    """The next ``count`` batches of an optimizer step, or None if the epoch has fewer left.

    A partial step at the end of an epoch is dropped, as torchtune does, so every optimizer
    step sees the same number of micro-batches.
    """
    step: list[Batch] = []
    for _ in range(count):
        batch = next(batches, None)
        if batch is None:
            return None
        step.append(batch)
    return step


def batch_to_device(batch: Batch, device: torch.device) -> Batch:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}
