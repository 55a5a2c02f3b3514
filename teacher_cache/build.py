"""``kdtune cache-teacher``: run the teacher once over the training data and store its top-k.

::

    kdtune cache-teacher --config CONFIG teacher_cache=DIR [--top_k 128] [key=value ...]
    kdtune cache-teacher --nproc_per_node 8 --config CONFIG teacher_cache=DIR

The config is the KD config training will use: the same tokenizer, dataset, collation and
``max_seq_len``; the teacher is built, loaded and (``teacher_quantization``) quantised as the
recipe does, in the config's ``dtype``; ``kd_loss.temperature`` is the cache's temperature and
``kd_loss.vocab_columns`` (if set) the compared vocabulary.

Work is split into shards of ``--samples_per_shard`` consecutive samples (dataset order; by
default 256, or fewer so that a shard stays under ``--max_shard_bytes``, 64 MiB: a killed
build loses at most one shard's work);
under ``torchrun`` rank r builds shards r, r + W, ... on its own device (every rank holds a
whole teacher; no process group is needed). Each shard is written to a temporary file, renamed
into place, then recorded with its SHA-256 in ``<shard>.json``. A rerun after a kill keeps every
shard whose file matches its record and rebuilds the rest; rank 0 waits for all shards and
writes ``manifest.json`` last. Shard contents depend only on the data, the teacher and the
options (not on the process count), so a resumed or differently-parallel build gives the same
bytes. Timing goes to ``build_stats.json``, the only file that differs between builds.

Shard layout (safetensors, memory-mappable): ``sample_index [n]`` int64, ``row_offsets [n + 1]``
int64 (the sample's rows are ``row_offsets[i]:row_offsets[i + 1]``), ``fingerprint [n]`` int64
(:func:`~kdtune.teacher_cache.data.row_fingerprint`), ``ids [P, id_bytes]`` uint8 and
``values [P, M + 1]`` float16 (:mod:`~kdtune.teacher_cache.encoding`), P = the shard's target
positions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from safetensors.torch import save_file
from torch import Tensor, nn
from torchtune import config, training, utils
from tqdm import tqdm

from kdtune import __version__
from kdtune.teacher_cache.data import row_fingerprint, target_positions
from kdtune.teacher_cache.encoding import DEFAULT_KNOTS, TopKCodec
from kdtune.teacher_cache.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    data_identity,
    kd_options,
    sha256_file,
    teacher_fingerprint,
    write_json_atomic,
)
from kdtune.teacher_cache.topk import topk_logprobs
from kdtune.training.checkpoint import state_dicts
from kdtune.training.config.errors import ConfigError
from kdtune.training.config.loading import load_config, resolve_config
from kdtune.training.config.rules import check_config
from kdtune.training.data import build_dataset, sft_collate, shift_labels
from kdtune.training.lm_head import forward_hidden, output_projection
from kdtune.training.model_facts import describe_model
from kdtune.training.runtime import build_model, finish_teacher

log = utils.get_logger("INFO")

PLAN = "plan.json"
BUILD_STATS = "build_stats.json"
# Fault injection for the kill-and-resume test only: the build SIGKILLs itself after writing
# this many shards plus half of the next one's temporary file.
_KILL_AFTER_SHARDS = "KDTUNE_TEST_KILL_CACHE_BUILD_AFTER_SHARDS"


@dataclass(frozen=True)
class BuildOptions:
    """What ``kdtune cache-teacher`` takes besides the config."""

    top_k: int = 128
    knots: int = DEFAULT_KNOTS
    value_dtype: str = "float16"
    samples_per_shard: int | None = None  # None: auto_samples_per_shard
    max_shard_bytes: int = 64 * 2**20  # the auto size's byte bound
    batch_size: int | None = None  # None: the config's batch_size
    positions_per_chunk: int = 512  # rows projected to [n, V] fp32 logits at once (~3 copies)


@dataclass(frozen=True)
class _Worker:
    rank: int
    world_size: int
    device: torch.device


def _worker(cfg: DictConfig) -> _Worker:
    """This process's rank and device under ``torchrun`` (no process group is started)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = utils.get_device(device=str(cfg.device))
    if world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return _Worker(rank, world_size, device)


def shard_name(number: int) -> str:
    return f"shard_{number:05d}.safetensors"


def _check_build_config(cfg: DictConfig) -> DictConfig:
    """The config must be a valid online KD config (teacher files included) plus the folder.

    Returns:
        The checked copy (absent optional keys at their defaults), ``teacher_cache`` kept.
    """
    if cfg.get("teacher_cache") is None:
        raise ConfigError(
            "teacher_cache is null: name the folder to build, e.g. "
            "`kdtune cache-teacher --config X teacher_cache=/data/teacher_cache`"
        )
    if cfg.teacher_model is None or cfg.teacher_checkpointer is None:
        raise ConfigError(
            "teacher_model / teacher_checkpointer are null: building a teacher cache runs the "
            "teacher; set both (the training run from the cache may then null them)"
        )
    online = cfg.copy()
    online.teacher_cache = None
    checked = check_config(online)
    checked.teacher_cache = cfg.teacher_cache
    return checked


MAX_SAMPLES_PER_SHARD = 256
"""The auto shard size's sample bound: a killed build loses at most this many samples' work."""


def auto_samples_per_shard(
    bytes_per_position: int, max_seq_len: int | None, max_shard_bytes: int
) -> int:
    """Samples per shard: ``MAX_SAMPLES_PER_SHARD``, or fewer so that a shard of samples of
    ``max_seq_len`` tokens (2,048 if unknown), every one a target, stays under
    ``max_shard_bytes`` (plus 24 bytes per sample of index, offset and fingerprint)."""
    per_sample = bytes_per_position * (max_seq_len or 2048) + 24
    return max(1, min(MAX_SAMPLES_PER_SHARD, max_shard_bytes // per_sample))


def _plan(
    cfg: DictConfig, options: BuildOptions, num_samples: int, max_seq_len: int | None = None
) -> dict[str, Any]:
    """Everything that determines the cache's contents (a resumed build must match it)."""
    vocab = describe_model(cfg.teacher_model).vocab_size
    columns = kd_options(cfg)["vocab_columns"]
    codec = TopKCodec(options.top_k, int(columns or vocab), options.knots, options.value_dtype)
    per_shard = options.samples_per_shard or auto_samples_per_shard(
        codec.describe()["bytes_per_position"], max_seq_len, options.max_shard_bytes
    )
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "top_k": options.top_k,
        "vocab_size": codec.vocab_size,
        "teacher_vocab_size": vocab,
        "encoding": codec.describe(),
        "identity": data_identity(cfg, num_samples),
        "teacher": teacher_fingerprint(cfg),
        "samples_per_shard": per_shard,
        "num_shards": -(-num_samples // per_shard),
    }


def _start_or_resume(folder: Path, plan: dict[str, Any], worker: _Worker) -> None:
    """Create the folder and its plan, or check that an earlier build's plan is this one."""
    path = folder / PLAN
    if worker.rank == 0 and not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, plan)
    while not path.exists():  # other ranks: rank 0 writes it first
        time.sleep(0.2)
    earlier = json.loads(path.read_text())
    if earlier != plan:
        differing = sorted(key for key in plan if earlier.get(key) != plan[key])
        raise ConfigError(
            f"teacher_cache = {str(folder)!r} holds (part of) a cache built with other settings "
            f"(differing: {differing}): pick another folder, or delete this one to rebuild"
        )


def _load_teacher(cfg: DictConfig, device: torch.device) -> nn.Module:
    """The teacher as the recipe builds it (meta build, strict load, eval, quantisation)."""
    dtype = training.get_dtype(str(cfg.dtype), device=device)
    teacher = build_model(cfg.teacher_model, dtype)
    teacher.requires_grad_(False)
    # torchtune's checkpointers create their output_dir when built: a read-only use gets a
    # throwaway one, so the build leaves no empty training folder behind.
    with tempfile.TemporaryDirectory(prefix="kdtune_teacher_read_") as unused:
        checkpointer = config.instantiate(cfg.teacher_checkpointer, output_dir=unused)
        state = checkpointer.load_checkpoint()[training.MODEL_KEY]
    state_dicts.load_full_state_dict(
        teacher, state, device=device, strict=True, broadcast_from_rank0=False
    )
    del state
    return finish_teacher(teacher, cfg.teacher_quantization)


class _ShardBuilder:
    """Computes one shard's tensors: teacher forward per batch, top-k per target position."""

    def __init__(self, cfg: DictConfig, options: BuildOptions, device: torch.device) -> None:
        self.options = options
        self.device = device
        kd = kd_options(cfg)
        self.temperature = kd["temperature"]
        self.ignore_index = kd["ignore_index"]
        self.codec: TopKCodec | None = None  # set by start(plan)
        self.tokenizer = config.instantiate(cfg.tokenizer)
        self.dataset = build_dataset(cfg.dataset, self.tokenizer)
        self.collate = sft_collate(self.tokenizer.pad_id, self.ignore_index)
        self.batch_size = options.batch_size or int(cfg.batch_size)
        self.teacher: nn.Module | None = None
        self.positions_done = 0  # over this run, for the progress bar's tokens/s
        self.started = time.perf_counter()
        self.cfg = cfg

    def start(self, plan: dict[str, Any]) -> None:
        options = self.options
        self.codec = TopKCodec(
            options.top_k, plan["vocab_size"], options.knots, options.value_dtype
        )

    @torch.no_grad()
    def build(self, samples: range, progress: tqdm) -> dict[str, Tensor]:
        """The tensors of the shard holding ``samples`` (the teacher is loaded on first use)."""
        if self.teacher is None:
            self.teacher = _load_teacher(self.cfg, self.device)
        packed, values, offsets, prints = [], [], [0], []
        for start in range(samples.start, samples.stop, self.batch_size):
            indices = range(start, min(start + self.batch_size, samples.stop))
            batch = self.collate([self.dataset[i] for i in indices])
            labels = shift_labels(batch["labels"], self.ignore_index)
            for row in labels:
                offsets.append(offsets[-1] + target_positions(row, self.ignore_index).numel())
                prints.append(row_fingerprint(row, self.ignore_index))
            batch_packed, batch_values = self._encode_batch(batch["tokens"], labels)
            packed.append(batch_packed)
            values.append(batch_values)
            self.positions_done += int(batch_packed.shape[0])
            seconds = max(time.perf_counter() - self.started, 1e-9)
            progress.set_postfix(tok_s=f"{self.positions_done / seconds:.0f}", refresh=False)
            progress.update(len(indices))
        return {
            "sample_index": torch.tensor(list(samples), dtype=torch.int64),
            "row_offsets": torch.tensor(offsets, dtype=torch.int64),
            "fingerprint": torch.tensor(prints, dtype=torch.int64),
            "ids": torch.cat(packed),
            "values": torch.cat(values),
        }

    def _encode_batch(self, tokens: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Rows of the batch's target positions in (sample, position) order."""
        hidden = forward_hidden(self.teacher, tokens.to(self.device))  # [B, S, D]
        weight, bias = output_projection(self.teacher)  # [V, D]
        rows = hidden[(labels != self.ignore_index).to(self.device)]  # [N, D]
        packed, values = [], []
        for chunk in rows.split(self.options.positions_per_chunk):
            logits = chunk @ weight.t()
            if bias is not None:
                logits = logits + bias
            logits = logits.float()[:, : self.codec.vocab_size]  # [n, V]
            ids, logprobs, rest = topk_logprobs(logits, self.codec.k, self.temperature)
            chunk_packed, chunk_values = self.codec.encode(ids, logprobs, rest)
            packed.append(chunk_packed)
            values.append(chunk_values)
        if not packed:
            return (
                torch.zeros(0, self.codec.id_bytes, dtype=torch.uint8),
                torch.zeros(0, self.codec.num_values, dtype=self.codec.dtype),
            )
        return torch.cat(packed), torch.cat(values)


def _shard_is_done(folder: Path, number: int) -> bool:
    """The shard's file exists and has the SHA-256 its record says (a finished shard)."""
    path, record = folder / shard_name(number), folder / f"{shard_name(number)}.json"
    if not (path.is_file() and record.is_file()):
        return False
    return json.loads(record.read_text())["sha256"] == sha256_file(path)


def _write_shard(folder: Path, number: int, tensors: dict[str, Tensor], samples: range) -> None:
    path = folder / shard_name(number)
    tmp = folder / f".{path.name}.tmp{os.getpid()}"
    save_file(tensors, str(tmp))
    os.chmod(tmp, 0o644)  # safetensors creates it owner-only; a cache is meant to be shared
    kill_after = os.environ.get(_KILL_AFTER_SHARDS)
    if kill_after is not None and number == int(kill_after):
        _kill_mid_write(tmp)
    os.replace(tmp, path)
    record = {
        "file": path.name,
        "sha256": sha256_file(path),
        "first_sample": samples.start,
        "num_samples": len(samples),
        "num_positions": int(tensors["row_offsets"][-1]),
        "bytes": path.stat().st_size,
    }
    write_json_atomic(folder / f"{path.name}.json", record)


def _kill_mid_write(tmp: Path) -> None:
    """Test-only: leave a truncated temporary shard and die as ``kill -9`` would."""
    import signal

    tmp.write_bytes(tmp.read_bytes()[: tmp.stat().st_size // 2])
    os.kill(os.getpid(), signal.SIGKILL)


def _remove_stale(folder: Path, numbers: list[int]) -> None:
    """This rank's temporary shard files left by a killed build (a shard that fails to verify
    is simply rebuilt and replaced)."""
    mine = {shard_name(n) for n in numbers}
    for path in folder.glob(".shard_*.tmp*"):
        if path.name[1:].split(".tmp")[0] in mine:
            path.unlink(missing_ok=True)


def _finish(folder: Path, plan: dict[str, Any]) -> dict[str, Any]:
    """Rank 0: wait for every shard's record, then write the manifest."""
    records = []
    for number in range(plan["num_shards"]):
        record = folder / f"{shard_name(number)}.json"
        waited = 0.0
        while not record.is_file():
            if waited == 0.0:
                log.info(f"waiting for the other ranks' shards ({record.name}) ...")
            time.sleep(0.5)
            waited += 0.5
        records.append(json.loads(record.read_text()))
    positions = sum(r["num_positions"] for r in records)
    size = sum(r["bytes"] for r in records)
    manifest = {
        **plan,
        "kdtune_version": __version__,
        "num_positions": positions,
        "bytes": size,
        "bytes_per_token": size / max(positions, 1),
        "shards": records,
    }
    write_json_atomic(folder / MANIFEST, manifest)
    return manifest


def build_teacher_cache(cfg: DictConfig, options: BuildOptions) -> dict[str, Any] | None:
    """Build (or finish) the cache named by ``cfg.teacher_cache``.

    Returns:
        The manifest on rank 0 (None on other ranks).

    Raises:
        ConfigError: a config problem, or a folder holding a cache of other settings.
    """
    started = time.perf_counter()
    cfg = _check_build_config(cfg)
    folder = Path(str(cfg.teacher_cache))
    worker = _worker(cfg)
    builder = _ShardBuilder(cfg, options, worker.device)
    plan = _plan(
        cfg, options, len(builder.dataset), getattr(builder.tokenizer, "max_seq_len", None)
    )
    builder.start(plan)
    _start_or_resume(folder, plan, worker)
    numbers = list(range(worker.rank, plan["num_shards"], worker.world_size))
    _remove_stale(folder, numbers)
    todo = [n for n in numbers if not _shard_is_done(folder, n)]
    spans = {n: _span(n, plan, len(builder.dataset)) for n in numbers}
    progress = tqdm(
        total=sum(len(spans[n]) for n in todo),
        unit="sample",
        disable=worker.rank != 0,
        dynamic_ncols=True,
        desc=f"cache-teacher ({len(numbers) - len(todo)} of {len(numbers)} shards done)",
    )
    positions = 0
    for number in todo:
        tensors = builder.build(spans[number], progress)
        positions += int(tensors["row_offsets"][-1])
        _write_shard(folder, number, tensors, spans[number])
    progress.close()
    seconds = time.perf_counter() - started
    if worker.rank != 0:
        return None
    manifest = _finish(folder, plan)
    write_json_atomic(
        folder / BUILD_STATS,
        {
            "seconds_last_run": seconds,
            "shards_built_last_run_rank0": len(todo),
            "positions_built_last_run_rank0": positions,
            "world_size": worker.world_size,
        },
    )
    return manifest


def _span(number: int, plan: dict[str, Any], num_samples: int) -> range:
    size = plan["samples_per_shard"]
    return range(number * size, min((number + 1) * size, num_samples))


def summary(manifest: dict[str, Any], folder: str | Path, seconds: float) -> str:
    """The lines ``kdtune cache-teacher`` prints at the end."""
    encoding = manifest["encoding"]
    return (
        f"teacher cache {folder}: {manifest['identity']['num_samples']} samples, "
        f"{manifest['num_positions']} target tokens, k = {manifest['top_k']}, T = "
        f"{manifest['identity']['temperature']}, V = {manifest['vocab_size']}\n"
        f"{manifest['bytes'] / 2**20:.1f} MiB, {manifest['bytes_per_token']:.1f} bytes/token "
        f"({encoding['bytes_per_position']} per position: {encoding['id_bits']}-bit ids, "
        f"{len(encoding['knot_ranks'])} {encoding['value_dtype']} knots + rest mass), built in "
        f"{seconds:.1f} s"
    )


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="kdtune cache-teacher",
        description="Cache the teacher's top-k log-probs over a KD config's training data "
        "(then train with the same config and teacher_cache=DIR).",
    )
    add_build_arguments(parser)
    return parser.parse_known_args(argv)


def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = BuildOptions()
    parser.add_argument("--config", required=True, help="KD config name (kdtune ls) or YAML")
    parser.add_argument("--top_k", type=int, default=defaults.top_k, help="ids kept per token")
    parser.add_argument(
        "--knots",
        type=int,
        default=defaults.knots,
        help="log-probs stored per token (the rest interpolated; >= top_k: all exact)",
    )
    parser.add_argument(
        "--value_dtype",
        choices=["float16", "float32"],
        default=defaults.value_dtype,
        help="storage of the log-probs (float32: only to measure what float16 costs)",
    )
    parser.add_argument(
        "--samples_per_shard",
        type=int,
        default=defaults.samples_per_shard,
        help="samples per shard file (the unit of resumption and of work per rank; default: "
        f"{MAX_SAMPLES_PER_SHARD}, or fewer to keep a shard under --max_shard_bytes)",
    )
    parser.add_argument(
        "--max_shard_bytes",
        type=int,
        default=defaults.max_shard_bytes,
        help="byte bound of the default shard size (samples of max_seq_len tokens)",
    )
    parser.add_argument(
        "--batch_size", type=int, default=None, help="teacher batch size (default: batch_size)"
    )


def cli_options(args: argparse.Namespace) -> dict[str, Any]:
    """The build options given on a command line (to pass them on to torchrun's processes)."""
    names = ("top_k", "knots", "value_dtype", "samples_per_shard", "max_shard_bytes", "batch_size")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def options_from_args(args: argparse.Namespace) -> BuildOptions:
    return BuildOptions(**cli_options(args))


def main(argv: list[str] | None = None) -> int:
    """``python -m kdtune.teacher_cache --config X teacher_cache=DIR`` (what torchrun runs)."""
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = load_config(resolve_config(args.config), overrides)
    started = time.perf_counter()
    manifest = build_teacher_cache(cfg, options_from_args(args))
    if manifest is not None:
        print(summary(manifest, cfg.teacher_cache, time.perf_counter() - started), flush=True)
    return 0
