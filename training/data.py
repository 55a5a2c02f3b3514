"""Datasets, batch collation and the label bookkeeping of the loss.

The loader (:func:`build_dataloader`) is torchdata's
``StatefulDataLoader`` over a ``StatefulDistributedSampler`` even in one process, so a
checkpoint records the exact position inside an epoch and the same code serves data-parallel
runs: rank ``r`` of ``W`` reads every ``W``-th sample of the epoch's permutation.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig
from torch import Tensor
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler
from torchtune import config
from torchtune.data import padded_collate_packed, padded_collate_sft
from torchtune.datasets import ConcatDataset

from kdtune.training.config.errors import ConfigError

Batch = dict[str, Tensor]


def build_dataset(
    cfg_dataset: DictConfig | ListConfig, tokenizer: Any, key: str = "dataset"
) -> Dataset:
    """One dataset node, or a list of them concatenated (torchtune's convention).

    Raises:
        ConfigError: the data cannot be loaded or holds no record (:func:`build_dataset_node`).
    """
    if isinstance(cfg_dataset, ListConfig):
        return ConcatDataset(
            [
                build_dataset_node(f"{key}[{i}]", node, tokenizer)
                for i, node in enumerate(cfg_dataset)
            ]
        )
    return build_dataset_node(key, cfg_dataset, tokenizer)


def data_files(node: DictConfig) -> list[str]:
    """The local files a dataset node reads (``data_files``: one path or a list; none for a
    Hugging Face Hub dataset)."""
    files = node.get("data_files")
    if files is None:
        return []
    return [str(files)] if isinstance(files, str) else [str(f) for f in files]


def data_source(node: DictConfig) -> str:
    """How messages name a node's data: its file(s), else its ``source``."""
    files = data_files(node)
    if files:
        return ", ".join(files)
    return str(node.get("source") or node["_component_"])


def json_file_problem(path: Path) -> str | None:
    """What is wrong with a ``source: json`` data file (None: nothing found): empty, an empty
    list, or the first place that is neither a JSON document nor JSON lines."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        return "is empty"
    try:
        document = json.loads(text)
    except json.JSONDecodeError as whole:
        if text.lstrip().startswith("["):
            return f"is not valid JSON: {whole.msg} at line {whole.lineno} column {whole.colno}"
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                json.loads(line)
            except json.JSONDecodeError as error:
                return f"line {number} is not valid JSON (one record per line): {error.msg}"
        return None
    if document == [] or document == {}:
        return "holds no records (an empty JSON document)"
    return None


def build_dataset_node(key: str, node: DictConfig, tokenizer: Any) -> Dataset:
    """``config.instantiate(node, tokenizer)``, its failures to load data named.

    Raises:
        ConfigError: naming ``key``, the file and what is wrong with it (empty, not JSON, the
            line at fault) and the fix; or the data holds no record.
    """
    try:
        dataset = config.instantiate(node, tokenizer)
    except Exception as error:
        raise ConfigError(_load_error(key, node, error)) from error
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ConfigError(
            f"{key}: {data_source(node)} gives no records (split {node.get('split')!r}): add "
            f"data, or fix {key}.data_files / {key}.split"
        )
    return dataset


def _load_error(key: str, node: DictConfig, error: Exception) -> str:
    if node.get("source") == "json":
        for file in data_files(node):
            path = Path(file)
            problem = json_file_problem(path) if path.is_file() else "does not exist"
            if problem is not None:
                return (
                    f"{key}.data_files: {file} {problem}: fix the file (a JSON list of records, "
                    "or one JSON record per line)"
                )
    cause = error.__cause__ or error
    return (
        f"{key}: {node['_component_']} cannot load {data_source(node)}: "
        f"{type(cause).__name__}: {cause}"
    )


def sft_collate(pad_id: int, ignore_index: int) -> Callable[[list[dict[str, Any]]], Batch]:
    """Samples -> ``{"tokens": [B, S], "labels": [B, S]}``, right-padded to the longest sample.

    ``tokens`` are padded with ``pad_id``, ``labels`` with ``ignore_index``. The loader itself is
    :func:`build_dataloader` (this rank's share of the seeded,
    per-epoch shuffled dataset, resumable mid-epoch).
    """
    return partial(padded_collate_sft, padding_idx=pad_id, ignore_idx=ignore_index)


def shift_labels(labels: Tensor, ignore_index: int, input_pos: Tensor | None = None) -> Tensor:
    """Targets aligned with the logits: position ``t`` predicts token ``t + 1``.

    ``labels[:, 1:]`` followed by one ``ignore_index`` column, so the logits need no slicing.
    ``[B, S] -> [B, S]``. For packed rows (``input_pos`` ``[B, S]``, restarting at 0 with each
    document), a document's last position has no target: the next token starts another
    document, so CE and KD both skip it, as they skip the last position of an unpacked row.
    """
    pad = torch.full_like(labels[:, :1], ignore_index)
    shifted = torch.cat([labels[:, 1:], pad], dim=1)
    if input_pos is None:
        return shifted
    next_starts = torch.cat([input_pos[:, 1:] == 0, torch.ones_like(pad, dtype=torch.bool)], 1)
    return shifted.masked_fill(next_starts, ignore_index)


def count_loss_tokens(shifted_labels: list[Tensor], ignore_index: int) -> Tensor:
    """Number of positions that contribute to the loss across micro-batches (int64 scalar).

    Counted on the *shifted* labels, i.e. exactly the positions the losses sum over.
    """
    total = torch.zeros((), dtype=torch.int64, device=shifted_labels[0].device)
    for labels in shifted_labels:
        total += (labels != ignore_index).sum()
    return total


def steps_per_epoch(
    num_batches: int, batch_size: int, accumulation: int, max_steps: int | None
) -> int:
    """Optimizer steps per epoch: whole steps of ``accumulation`` batches, at most ``max_steps``.

    Raises:
        ValueError: not one whole step (names the keys to change).
    """
    steps = num_batches // accumulation
    if max_steps is not None:
        steps = min(steps, int(max_steps))
    if steps == 0:
        raise ValueError(
            f"the dataset gives {num_batches} batches of batch_size {batch_size} per rank, "
            f"fewer than gradient_accumulation_steps = {accumulation}: lower batch_size or "
            "gradient_accumulation_steps"
        )
    return steps


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


def model_inputs(batch: Batch) -> dict[str, Any]:
    """The batch's keyword arguments for the models' forward: a packed batch's ``mask``
    (``[B, S, S]`` block-causal, or a flex-attention ``BlockMask``: no attention across
    documents) and ``input_pos`` (``[B, S]``: positions restart with each document); none for
    an unpacked batch."""
    return {key: batch[key] for key in ("mask", "input_pos") if key in batch}


SAMPLE_INDEX = "sample_index"


class IndexedDataset(Dataset):
    """``dataset[i]`` plus ``"sample_index": i``: a sample's identity, whatever the shuffling,
    the process count or the resume point (the teacher cache and on-policy steps use it).

    ``left_out``: indices of ``dataset`` that are not served (samples without a target); the
    others keep their own index as ``sample_index``.
    """

    def __init__(self, dataset: Dataset, left_out: list[int] | None = None) -> None:
        self.dataset = dataset
        dropped = set(left_out or ())
        size = len(dataset)  # type: ignore[arg-type]
        self.indices = [i for i in range(size) if i not in dropped] if dropped else None

    def __len__(self) -> int:
        return len(self.dataset if self.indices is None else self.indices)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.indices is not None:
            index = self.indices[index]
        return {**self.dataset[index], SAMPLE_INDEX: index}


def collate_with_sample_index(
    collate: Callable[[list[dict[str, Any]]], Batch],
) -> Callable[[list[dict[str, Any]]], Batch]:
    """Wrap a collate function: the batch gains ``"sample_index"``, an int64 ``[B]`` tensor,
    when the samples carry one (:class:`IndexedDataset`); other samples collate as before."""

    def collate_fn(samples: list[dict[str, Any]]) -> Batch:
        batch = collate([{k: v for k, v in s.items() if k != SAMPLE_INDEX} for s in samples])
        if samples and SAMPLE_INDEX in samples[0]:
            indices = [s[SAMPLE_INDEX] for s in samples]
            batch[SAMPLE_INDEX] = torch.tensor(indices, dtype=torch.int64)
        return batch

    return collate_fn


def rank_loaders(
    cfg: DictConfig,
    tokenizer: Any,
    ignore_index: int,
    seed: int,
    rank: int,
    world_size: int,
    left_out: list[int] | None = None,
) -> tuple[StatefulDataLoader, StatefulDataLoader | None]:
    """This rank's training loader (``dataset`` less the ``left_out`` samples, ``batch_size``,
    ``shuffle``; incomplete last batch dropped; each batch carries its samples'
    ``sample_index``) and validation loader (``validation_dataset``, ``validation_batch_size``
    or ``batch_size``; in order, nothing dropped; None without a validation dataset)."""
    collate = sft_collate(tokenizer.pad_id, ignore_index)

    def loader(
        key: str, batch_size: int, *, train: bool, indexed: bool = False
    ) -> StatefulDataLoader:
        node = cfg[key]
        packed = isinstance(node, DictConfig) and bool(node.get("packed", False))
        dataset = build_dataset(node, tokenizer, key)
        # Packed rows are already max_seq_len long; the mask keeps documents apart.
        collate_fn = padded_collate_packed if packed else collate
        if indexed:
            dataset = IndexedDataset(dataset, left_out)
            collate_fn = collate_with_sample_index(collate_fn)
        return build_dataloader(
            dataset,
            batch_size=batch_size,
            collate_fn=collate_fn,
            shuffle=bool(cfg.shuffle) and train,
            seed=seed,
            rank=rank,
            world_size=world_size,
            drop_last=train,
        )

    train = loader("dataset", cfg.batch_size, train=True, indexed=True)
    if cfg.validation_dataset is None:
        return train, None
    batch_size = cfg.validation_batch_size or cfg.batch_size
    return train, loader("validation_dataset", batch_size, train=False)


def build_dataloader(
    dataset: Dataset,
    *,
    batch_size: int,
    collate_fn: Any,
    shuffle: bool,
    seed: int,
    rank: int,
    world_size: int,
    drop_last: bool,
) -> StatefulDataLoader:
    """A resumable loader over this rank's share of the dataset.

    ``StatefulDataLoader`` over a ``StatefulDistributedSampler`` (torch's
    ``DistributedSampler`` plus a position): the epoch's order is a permutation seeded by
    ``seed + epoch``, rank ``r`` reads every ``world_size``-th index starting at ``r``, so the
    ranks' shards are disjoint and a step's global batch (all ranks, ``batch_size`` each) is
    the same set of samples as one process reading ``world_size * batch_size``.
    ``loader.state_dict()`` records the position inside the epoch.

    Call ``loader.sampler.set_epoch(epoch)`` before iterating each epoch, and on resume before
    ``loader.load_state_dict(state)``, with the epoch the state was saved in.

    Args:
        batch_size: samples per batch on this rank.
        collate_fn: list of samples -> batch.
        shuffle: reshuffle each epoch (seeded); False keeps the dataset order.
        seed: the permutation seed, the same on every rank.
        rank, world_size: this rank and the number of ranks (0 and 1 for one process).
        drop_last: drop the last incomplete batch of this rank. The sampler itself always pads
            the dataset (by repeating its first samples) to a multiple of ``world_size``, so
            every rank yields the same number of batches.

    Raises:
        ValueError: a rank outside ``[0, world_size)`` or a non-positive size.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"build_dataloader: rank={rank}, world_size={world_size}: need world_size >= 1 "
            "and 0 <= rank < world_size"
        )
    if batch_size < 1:
        raise ValueError(f"build_dataloader: batch_size={batch_size}: need a positive size")
    sampler = StatefulDistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed
    )
    return StatefulDataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        drop_last=drop_last,
        # Its own generator: a DataLoader draws a base seed from its generator whenever an
        # iterator starts; drawing from the global one would shift the training's random
        # stream (dropout) whenever a resumed run starts its iterator mid-epoch.
        generator=torch.Generator().manual_seed(seed),
    )
