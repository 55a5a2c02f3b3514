"""Reading a finished cache: the teacher's top-k view of a training batch, by sample index.

Shards are opened with ``safetensors.safe_open`` (memory-mapped): a lookup reads only the rows
of the batch's samples. Rows are decoded (:class:`~kdtune.teacher_cache.encoding.TopKCodec`)
and scattered to the batch's target positions, giving the ``TopKTeacher`` the losses take.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from kdtune.teacher_cache.data import row_fingerprint, target_positions
from kdtune.teacher_cache.encoding import TopKCodec
from kdtune.teacher_cache.manifest import read_manifest
from kdtune.teacher_cache.topk import TopKTeacher


@dataclass(frozen=True)
class _SampleRows:
    shard: int
    start: int  # first row in the shard
    count: int  # number of rows (the sample's target positions)
    fingerprint: int


class TeacherCache:
    """A complete cache folder, memory-mapped.

    Attributes:
        manifest: the parsed ``manifest.json``.
        codec: the encoding of its rows.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.manifest: dict[str, Any] = read_manifest(self.folder)
        encoding = self.manifest["encoding"]
        self.codec = TopKCodec(
            k=int(self.manifest["top_k"]),
            vocab_size=int(self.manifest["vocab_size"]),
            num_knots=len(encoding["knot_ranks"]),
            value_dtype=encoding["value_dtype"],
        )
        if self.codec.describe() != encoding:
            raise ValueError(f"{self.folder}: the manifest's encoding {encoding} is not readable")
        self._shards = []
        self._rows: dict[int, _SampleRows] = {}
        for number, shard in enumerate(self.manifest["shards"]):
            handle = safe_open(str(self.folder / shard["file"]), framework="pt")
            self._shards.append(handle)
            index = handle.get_tensor("sample_index").tolist()
            offsets = handle.get_tensor("row_offsets").tolist()
            prints = handle.get_tensor("fingerprint").tolist()
            for i, sample in enumerate(index):
                self._rows[sample] = _SampleRows(
                    number, offsets[i], offsets[i + 1] - offsets[i], prints[i]
                )

    @property
    def num_samples(self) -> int:
        return len(self._rows)

    def sample_rows(self, sample: int) -> tuple[Tensor, Tensor]:
        """One sample's encoded rows: ``(packed ids [n, id_bytes], values [n, M + 1])``."""
        rows = self._rows.get(sample)
        if rows is None:
            raise KeyError(
                f"sample {sample} is not in the teacher cache {self.folder} "
                f"({self.num_samples} samples): the cache was built from other data"
            )
        handle = self._shards[rows.shard]
        window = slice(rows.start, rows.start + rows.count)
        return handle.get_slice("ids")[window], handle.get_slice("values")[window]

    def lookup(
        self, sample_index: Tensor, shifted_labels: Tensor, ignore_index: int
    ) -> TopKTeacher:
        """The teacher's top-k distributions for a batch.

        Args:
            sample_index: ``[B]`` dataset indices of the batch's samples.
            shifted_labels: ``[B, S]`` labels aligned with the logits
                (:func:`kdtune.training.data.shift_labels`); positions with ``ignore_index``
                get zeros.
            ignore_index: the label value without a target.

        Returns:
            ``TopKTeacher`` with ``[B, S, k]`` ids and log-probs and ``[B, S]`` rest log-mass, on
            ``shifted_labels``' device.

        Raises:
            ValueError: a sample's rows do not match its targets (other data or tokenisation).
        """
        batch, length = shifted_labels.shape
        k = self.codec.k
        labels = shifted_labels.cpu()
        packed, values, where = [], [], []
        for b, sample in enumerate(sample_index.tolist()):
            positions = target_positions(labels[b], ignore_index)
            rows = self._rows.get(sample)
            fingerprint = row_fingerprint(labels[b], ignore_index)
            if rows is not None and (rows.count, rows.fingerprint) != (
                positions.numel(),
                fingerprint,
            ):
                raise ValueError(
                    f"teacher cache {self.folder}: sample {sample} has {rows.count} cached "
                    f"target positions but the batch has {positions.numel()} (or other "
                    "target tokens): the cache was built from other data or tokenisation; "
                    "rebuild it with `kdtune cache-teacher`"
                )
            sample_packed, sample_values = self.sample_rows(sample)
            packed.append(sample_packed)
            values.append(sample_values)
            where.append(positions + b * length)
        ids, logprobs, rest = self.codec.decode(torch.cat(packed), torch.cat(values))
        flat = torch.cat(where)
        out_ids = torch.zeros(batch * length, k, dtype=torch.int64)
        out_logprobs = torch.zeros(batch * length, k, dtype=torch.float32)
        out_rest = torch.zeros(batch * length, dtype=torch.float32)
        out_ids[flat], out_logprobs[flat], out_rest[flat] = ids, logprobs, rest
        device = shifted_labels.device
        return TopKTeacher(
            token_ids=out_ids.view(batch, length, k).to(device),
            logprobs=out_logprobs.view(batch, length, k).to(device),
            rest_logmass=out_rest.view(batch, length).to(device),
        )
