"""``kdtune prune SRC DST ...``: a smaller Llama-family HF folder, Minitron-style.

::

    kdtune prune SRC DST --layers 15 --config smollm2/135M_prune15_kd assets_dir=./kdtune_real
    kdtune prune SRC DST --heads 6 --mlp 1024 --hidden 384 --config <name|yaml> [key=value ...]
    kdtune prune SRC DST --target-params 53000000 --axes width --config ... [--dry-run]
    kdtune prune SRC DST --drop-layers 3,5-7                      (no calibration needed)

Sizes chosen by score need calibration samples: ``--config`` names a kdtune config (shipped
name or YAML) whose ``tokenizer`` and ``dataset`` nodes give them (trailing ``key=value``
overrides apply); ``--samples`` windows of ``--seq-len`` tokens, order seeded by ``--seed``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from kdtune.models.hf_llama import load_hf_folder
from kdtune.models.hf_llama import read_hf_state_dict as read_state
from kdtune.pruning.apply import Keep, folder_hash, prune_state_dict, write_folder
from kdtune.pruning.plan import (
    PruneError,
    Request,
    Shape,
    check_destination,
    parse_axes,
    pruned_config,
    read_source,
    target_shape,
)
from kdtune.pruning.scores import Scores, calibration_batches, keep_top, score_model
from kdtune.training.config.loading import load_config, resolve_config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def add_prune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("::")[0].strip()
    parser.add_argument("src", type=Path, help="Llama-family HF folder (config.json, safetensors)")
    parser.add_argument("dst", type=Path, help="new folder to write (never overwritten)")
    depth = parser.add_mutually_exclusive_group()
    depth.add_argument("--layers", type=int, help="layers to keep (lowest block influence go)")
    depth.add_argument("--drop-layers", help="layers to drop: N, N-M, comma-separated (3,5-7)")
    parser.add_argument("--heads", type=int, help="query heads to keep (whole KV groups)")
    parser.add_argument("--kv-heads", type=int, help="KV heads (groups) to keep")
    parser.add_argument("--mlp", type=int, help="MLP channels to keep (intermediate_size)")
    parser.add_argument("--hidden", type=int, help="hidden/embedding channels to keep")
    parser.add_argument(
        "--target-params", type=int, help="choose sizes for about this many parameters"
    )
    parser.add_argument(
        "--axes",
        default="depth,heads,mlp,hidden",
        help="axes --target-params may shrink: depth, heads, mlp, hidden, width (=the last 3)",
    )
    parser.add_argument(
        "--count",
        choices=("non-embedding", "total"),
        default="non-embedding",
        help="what --target-params counts (default: without embeddings and lm head)",
    )
    parser.add_argument(
        "--multiple-of",
        type=int,
        default=None,
        help="keep MLP and hidden widths multiples of this (32: exportable to GGUF Q8_0/Q4_0)",
    )
    parser.add_argument("--config", help="kdtune config (name or YAML) with tokenizer and dataset")
    parser.add_argument("--samples", type=int, default=64, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per window")
    parser.add_argument("--seed", type=int, default=0, help="calibration sample order")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="forward dtype")
    parser.add_argument("--dry-run", action="store_true", help="print scores and sizes only")


def request_of(args: argparse.Namespace) -> Request:
    return Request(
        layers=args.layers,
        drop_layers=args.drop_layers,
        heads=args.heads,
        kv_heads=args.kv_heads,
        mlp=args.mlp,
        hidden=args.hidden,
        target_params=args.target_params,
        axes=parse_axes(args.axes),
        count_embeddings=args.count == "total",
        multiple_of=args.multiple_of,
    )


def prune_main(args: argparse.Namespace) -> int:
    """The ``kdtune prune`` handler: one-line error (exit 2) for a bad request."""
    try:
        prune_folder(
            args.src,
            args.dst,
            request_of(args),
            config=args.config,
            overrides=getattr(args, "overrides", []),
            samples=args.samples,
            seq_len=args.seq_len,
            seed=args.seed,
            dtype=DTYPES[args.dtype],
            dry_run=args.dry_run,
            command=" ".join(["kdtune", "prune", *sys.argv[2:]]),
        )
    except PruneError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def prune_folder(
    src: Path,
    dst: Path,
    request: Request,
    *,
    config: str | None = None,
    overrides: list[str] | None = None,
    samples: int = 64,
    seq_len: int = 256,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    dry_run: bool = False,
    command: str = "",
    log=print,
) -> dict[str, Any]:
    """Prune ``src`` into ``dst``; returns the ``prune.json`` record (written unless dry run).

    Raises :class:`PruneError` for an impossible request before any weight is read.
    """
    src, dst = Path(src), Path(dst)
    hf_config = read_source(src)
    if not dry_run:
        check_destination(src, dst)
    source = Shape.of(hf_config)
    shape, dropped = target_shape(source, request)
    scored = (
        (shape.layers != source.layers and dropped is None)
        or shape.kv_heads != source.kv_heads
        or shape.mlp != source.mlp
        or shape.hidden != source.hidden
    )
    cfg = None
    if scored or (dry_run and config):
        if config is None:
            raise PruneError(
                "choosing what to prune needs calibration samples: pass --config <name|yaml> "
                "with tokenizer and dataset nodes (or --drop-layers for named layers)"
            )
        try:
            cfg = load_config(resolve_config(config), overrides or [])
        except LookupError as error:
            raise PruneError(f"--config: {error}") from None
        missing = [key for key in ("tokenizer", "dataset") if key not in cfg]
        if missing:
            raise PruneError(f"--config {config}: no {' or '.join(missing)} node")
        if samples < 1 or seq_len < 2:
            raise PruneError(f"--samples {samples} / --seq-len {seq_len}: need >= 1 and >= 2")

    scores = None
    started = time.perf_counter()
    if cfg is not None:
        try:
            batches = calibration_batches(cfg, samples, seq_len, seed)
        except ValueError as error:
            raise PruneError(str(error)) from None
        model = load_hf_folder(src, dtype=dtype, max_seq_len=max(seq_len, 16))
        scores = score_model(model, batches, source.kv_heads)
        del model
        log(
            f"[prune] scored {scores.tokens} calibration tokens in "
            f"{time.perf_counter() - started:.1f} s"
        )
    keep = choose(source, shape, dropped, scores)
    if dry_run or scores is not None:
        log(report(source, shape, keep, scores))
    record = {
        "source": str(src.resolve()),
        "source_sha256": None if dry_run else folder_hash(src),
        "command": command,
        "source_shape": asdict(source),
        "shape": asdict(shape),
        "params": {"total": shape.params(), "non_embedding": shape.params(embeddings=False)},
        "source_params": {
            "total": source.params(),
            "non_embedding": source.params(embeddings=False),
        },
        "kept": keep.as_dict(),
        "calibration": None
        if cfg is None
        else {
            "config": config,
            "overrides": overrides,
            "samples": samples,
            "seq_len": seq_len,
            "seed": seed,
            "dtype": str(dtype),
        },
        "scores": None if scores is None else scores.as_dict(),
        "aggregation": "width: L2 over positions, mean over samples; depth: 1 - mean cos",
    }
    if dry_run:
        return record
    state = prune_state_dict(read_state(src), keep, source.group, source.head_dim)
    write_folder(src, dst, state, pruned_config(hf_config, shape), record)
    log(
        f"[prune] wrote {dst}: {shape.params():,} parameters "
        f"({shape.params(embeddings=False):,} without embeddings)"
    )
    return record


def choose(source: Shape, shape: Shape, dropped: list[int] | None, scores: Scores | None) -> Keep:
    """Kept indices: named layers dropped, else the top-scoring units of each axis."""
    every = list(range(source.layers))
    if dropped is not None:
        layers = [i for i in every if i not in dropped]
    elif shape.layers < source.layers:
        layers = keep_top(scores.layers, shape.layers)
    else:
        layers = every

    def per_layer(table, size: int, full: int) -> dict[int, list[int]]:
        if size == full:
            return {i: list(range(full)) for i in layers}
        return {i: keep_top(table[i], size) for i in layers}

    return Keep(
        layers=layers,
        groups=per_layer(
            None if scores is None else scores.groups, shape.kv_heads, source.kv_heads
        ),
        mlp=per_layer(None if scores is None else scores.mlp, shape.mlp, source.mlp),
        hidden=list(range(source.hidden))
        if shape.hidden == source.hidden
        else keep_top(scores.hidden, shape.hidden),
    )


def report(source: Shape, shape: Shape, keep: Keep, scores: Scores | None) -> str:
    """The ``--dry-run`` text: scores per layer and group, extreme channels, the chosen sizes."""
    lines = []
    if scores is not None:
        lines.append("layer  block-influence  kept  KV-group scores (kept*)  MLP score mean")
        for i in range(source.layers):
            groups = " ".join(
                f"{s:8.2f}{'*' if g in keep.groups.get(i, []) else ' '}"
                for g, s in enumerate(scores.groups[i].tolist())
            )
            lines.append(
                f"{i:5d}  {scores.layers[i].item():15.5f}  {'yes' if i in keep.layers else ' no'}"
                f"  {groups}  {scores.mlp[i].mean().item():10.3f}"
            )
        order = scores.hidden.argsort(descending=True).tolist()
        lines.append(f"hidden channels, top 8: {order[:8]}  bottom 8: {order[-8:]}")
        mlp_order = scores.mlp.sum(0).argsort(descending=True).tolist()
        lines.append(
            f"MLP channels (summed over layers), top 8: {mlp_order[:8]}  bottom 8: {mlp_order[-8:]}"
        )
    for name in ("layers", "heads", "kv_heads", "mlp", "hidden"):
        lines.append(f"{name:>9}: {getattr(source, name)} -> {getattr(shape, name)}")
    lines.append(
        f"   params: {source.params():,} -> {shape.params():,} (non-embedding "
        f"{source.params(embeddings=False):,} -> {shape.params(embeddings=False):,})"
    )
    return "\n".join(lines)
