"""Reading a finished cache: the teacher's top-k view of a training batch, by sample index.

Shards are opened with ``safetensors.safe_open`` (memory-mapped): a lookup reads only the rows
of the batch's samples. Rows are decoded (:class:`~kdtune.teacher_cache.encoding.TopKCodec`)
and scattered to the batch's target positions, giving the ``TopKTeacher`` the losses take.

Integrity: opening the cache checks the manifest and that every shard file exists with the
size its record gives (cheap: a missing or truncated shard is named at once, before any model
is built). A shard's content is checked against its recorded SHA-256 when a lookup first
needs it, before any of its bytes are used (also its index: which shard holds a sample comes
from the manifest). So the hashing is spread over the first epoch (each shard once per
process) instead of delaying the start; a damaged shard stops the run at the first batch that
needs it, with one line naming the file and the command that repairs the cache. Caches whose
records carry no hash are read with one warning.
"""

from __future__ import annotations

import bisect
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from kdtune.teacher_cache.data import row_fingerprint, target_positions
from kdtune.teacher_cache.encoding import TopKCodec
from kdtune.teacher_cache.manifest import read_manifest, rebuild_hint, sha256_file
from kdtune.teacher_cache.topk import TopKTeacher
from kdtune.training.config.errors import ConfigError


class TeacherCacheError(ConfigError):
    """A cache file is missing or damaged; the message names it and the repairing command."""


@dataclass
class _Shard:
    path: Path
    record: dict[str, Any]  # the manifest's entry: file, sha256, first_sample, num_samples, ...
    handle: Any = None  # safe_open, once verified
    offsets: list[int] | None = None  # [n + 1]: the sample's rows are offsets[i]:offsets[i + 1]
    prints: list[int] | None = None  # [n] row fingerprints


class TeacherCache:
    """A complete cache folder, memory-mapped, each shard verified on first use.

    Attributes:
        manifest: the parsed ``manifest.json``.
        codec: the encoding of its rows.

    Raises:
        ConfigError: a broken manifest; :class:`TeacherCacheError` for a missing shard or one
            of another size than recorded (each naming the file and the repairing command).
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
        records = sorted(self.manifest["shards"], key=lambda record: record["first_sample"])
        self._shards = [_Shard(self.folder / record["file"], record) for record in records]
        self._firsts = [record["first_sample"] for record in records]
        for shard in self._shards:
            self._check_file(shard)
        unhashed = [s.path.name for s in self._shards if not s.record.get("sha256")]
        if unhashed:
            warnings.warn(
                f"teacher cache {self.folder}: {len(unhashed)} shard(s) have no recorded SHA-256 "
                f"({unhashed[0]}, ...), so their content is not verified; {rebuild_hint(folder)}",
                stacklevel=2,
            )

    def _fail(self, shard: _Shard, problem: str) -> TeacherCacheError:
        return TeacherCacheError(
            f"teacher cache shard {shard.path} {problem}; {rebuild_hint(self.folder)}"
        )

    def _check_file(self, shard: _Shard) -> None:
        """Cheap: the file exists with the recorded size."""
        if not shard.path.is_file():
            raise self._fail(shard, "is missing")
        size, recorded = shard.path.stat().st_size, shard.record.get("bytes")
        if recorded is not None and size != recorded:
            raise self._fail(shard, f"has {size} bytes, its record says {recorded} (truncated?)")

    def _verified(self, number: int) -> _Shard:
        """Shard ``number``, its content checked against its SHA-256 on first use, opened and
        its index read."""
        shard = self._shards[number]
        if shard.handle is not None:
            return shard
        self._check_file(shard)
        expected = shard.record.get("sha256")
        if expected and sha256_file(shard.path) != expected:
            raise self._fail(shard, "does not match its recorded SHA-256 (the file is damaged)")
        try:
            handle = safe_open(str(shard.path), framework="pt")
            index = handle.get_tensor("sample_index").tolist()
            offsets = handle.get_tensor("row_offsets").tolist()
            prints = handle.get_tensor("fingerprint").tolist()
        except Exception as error:  # SafetensorError and friends: an unreadable file
            raise self._fail(shard, f"is not a readable cache shard ({error})") from None
        first, count = shard.record["first_sample"], shard.record["num_samples"]
        if index != list(range(first, first + count)) or len(offsets) != count + 1:
            raise self._fail(shard, f"does not hold samples {first}..{first + count - 1}")
        shard.offsets, shard.prints, shard.handle = offsets, prints, handle
        return shard

    def _locate(self, sample: int) -> tuple[_Shard, int] | None:
        """The verified shard holding ``sample`` and the sample's position in it, or None."""
        number = bisect.bisect_right(self._firsts, sample) - 1
        if (
            number < 0
            or sample - self._firsts[number] >= self._shards[number].record["num_samples"]
        ):
            return None
        return self._verified(number), sample - self._firsts[number]

    @property
    def num_samples(self) -> int:
        return sum(shard.record["num_samples"] for shard in self._shards)

    def verify_all(self) -> None:
        """Check every shard now (what a lookup does shard by shard)."""
        for number in range(len(self._shards)):
            self._verified(number)

    def sample_rows(self, sample: int) -> tuple[Tensor, Tensor, int]:
        """One sample's encoded rows: ``(packed ids [n, id_bytes], values [n, M + 1])`` and
        its row fingerprint.

        Raises:
            KeyError: the cache has no such sample.
            TeacherCacheError: its shard is damaged.
        """
        found = self._locate(sample)
        if found is None:
            raise KeyError(
                f"sample {sample} is not in the teacher cache {self.folder} "
                f"({self.num_samples} samples): the cache was built from other data"
            )
        shard, i = found
        window = slice(shard.offsets[i], shard.offsets[i + 1])
        ids, values = (
            shard.handle.get_slice("ids")[window],
            shard.handle.get_slice("values")[window],
        )
        return ids, values, shard.prints[i]

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
            TeacherCacheError: a shard the batch needs is damaged (checked on its first use).
        """
        batch, length = shifted_labels.shape
        k = self.codec.k
        labels = shifted_labels.cpu()
        packed, values, where = [], [], []
        for b, sample in enumerate(sample_index.tolist()):
            positions = target_positions(labels[b], ignore_index)
            sample_packed, sample_values, cached_print = self.sample_rows(sample)
            fingerprint = row_fingerprint(labels[b], ignore_index)
            if (sample_packed.shape[0], cached_print) != (positions.numel(), fingerprint):
                raise ValueError(
                    f"teacher cache {self.folder}: sample {sample} has {sample_packed.shape[0]} "
                    f"cached target positions but the batch has {positions.numel()} (or other "
                    "target tokens): the cache was built from other data or tokenisation; "
                    "rebuild it with `kdtune cache-teacher`"
                )
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
