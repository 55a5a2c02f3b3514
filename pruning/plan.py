"""What to prune: the source's shape, the requested sizes, their checks and parameter counts.

Everything here reads only ``config.json``: every impossible request is a one-line
``PruneError`` before a weight or a calibration sample is loaded.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kdtune.models.hf_llama import check_llama_family, head_dim_of

AXES = ("depth", "heads", "mlp", "hidden")
"""Minitron's four axes; ``width`` in ``--axes`` means heads, mlp and hidden."""


class PruneError(ValueError):
    """A request ``kdtune prune`` cannot do; the message names the option and the fix."""


@dataclass(frozen=True)
class Shape:
    """The sizes pruning changes (plus what the parameter count needs)."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int
    hidden: int
    vocab: int
    tied: bool
    qkv_bias: bool

    @classmethod
    def of(cls, config: dict[str, Any]) -> Shape:
        return cls(
            layers=config["num_hidden_layers"],
            heads=config["num_attention_heads"],
            kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
            head_dim=head_dim_of(config),
            mlp=config["intermediate_size"],
            hidden=config["hidden_size"],
            vocab=config["vocab_size"],
            tied=config.get("tie_word_embeddings", config["model_type"] != "qwen2"),
            qkv_bias=config["model_type"] == "qwen2",
        )

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.heads // self.kv_heads

    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    def layer_params(self) -> int:
        d, hd = self.hidden, self.head_dim
        attn = d * self.heads * hd * 2 + d * self.kv_heads * hd * 2
        bias = (self.heads + 2 * self.kv_heads) * hd if self.qkv_bias else 0
        return attn + bias + 3 * d * self.mlp + 2 * d

    def params(self, embeddings: bool = True) -> int:
        """Parameter count of the HF model (``embeddings=False``: without embedding/lm head)."""
        body = self.layers * self.layer_params() + self.hidden
        return body + (self.embedding_params() if embeddings else 0)


def read_source(src: Path) -> dict[str, Any]:
    """``src/config.json`` after the Llama-family and file checks."""
    if not (src / "config.json").is_file():
        raise PruneError(f"SRC {src}: no config.json (pass a Hugging Face model folder)")
    if not any(src.glob("*.safetensors")):
        raise PruneError(f"SRC {src}: no *.safetensors weights (convert the model to safetensors)")
    config = json.loads((src / "config.json").read_text())
    try:
        check_llama_family(config, where=f"{src}/config.json")
    except ValueError as error:
        raise PruneError(str(error)) from None
    return config


def check_destination(src: Path, dst: Path) -> None:
    src_r, dst_r = src.resolve(), dst.resolve()
    if dst_r == src_r or src_r in dst_r.parents:
        raise PruneError(f"DST {dst} is SRC or inside it; write the pruned model elsewhere")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise PruneError(
            f"DST {dst} exists and is not empty; pass a new folder (never overwritten)"
        )


def parse_layer_list(spec: str, num_layers: int, option: str = "--drop-layers") -> list[int]:
    """``"3,5-7"`` -> ``[3, 5, 6, 7]``; negative numbers count from the end.

    Raises ``PruneError`` for a bad item, a reversed range (``3-1``), a layer out of range, a
    repeat, or an empty list.
    """
    layers: list[int] = []
    for part in (p.strip() for p in spec.split(",")):
        match = re.fullmatch(r"(-?\d+)(?:-(-?\d+))?", part)
        if not match:
            raise PruneError(f"{option}: {part!r} is not N or N-M (e.g. {option} 3,5-7)")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        first, last = (n + num_layers if n < 0 else n for n in (first, last))
        if last < first:
            raise PruneError(f"{option}: range {part!r} is reversed; write it low-high")
        if first < 0 or last >= num_layers:
            raise PruneError(f"{option}: {part!r} is outside layers 0..{num_layers - 1}")
        layers.extend(range(first, last + 1))
    if not layers:
        raise PruneError(f"{option}: no layers given")
    if len(set(layers)) != len(layers):
        raise PruneError(f"{option}: {spec!r} names a layer twice (overlapping ranges)")
    return sorted(layers)


def multiple_for(size: int) -> int:
    """The rounding step of a pruned width: 64 where the source width is a multiple of 64."""
    return 64 if size % 64 == 0 else 8


@dataclass(frozen=True)
class Request:
    """The command line's targets (``None``: keep that axis)."""

    layers: int | None = None
    drop_layers: str | None = None
    heads: int | None = None
    kv_heads: int | None = None
    mlp: int | None = None
    hidden: int | None = None
    target_params: int | None = None
    axes: tuple[str, ...] = AXES
    count_embeddings: bool = False
    multiple_of: int | None = None  # every kept MLP / hidden width a multiple of this


def parse_axes(spec: str) -> tuple[str, ...]:
    axes: list[str] = []
    for name in (s.strip() for s in spec.split(",")):
        expanded = ("heads", "mlp", "hidden") if name == "width" else (name,)
        for axis in expanded:
            if axis not in AXES:
                raise PruneError(f"--axes: {name!r} is not one of {', '.join(AXES)}, width")
            if axis not in axes:
                axes.append(axis)
    return tuple(axes)


def target_shape(source: Shape, request: Request) -> tuple[Shape, list[int] | None]:
    """The pruned shape, and the layers to drop when ``--drop-layers`` names them.

    Explicit sizes are checked against the source; ``--target-params`` chooses them.
    """
    explicit = any(
        v is not None
        for v in (request.layers, request.heads, request.kv_heads, request.mlp, request.hidden)
    )
    if request.target_params is not None and (explicit or request.drop_layers is not None):
        raise PruneError("--target-params chooses the sizes; drop --layers/--heads/... with it")
    if request.layers is not None and request.drop_layers is not None:
        raise PruneError("--layers and --drop-layers both set; pass one of them")
    if request.multiple_of is not None and request.multiple_of < 1:
        raise PruneError(f"--multiple-of {request.multiple_of}: must be at least 1")
    if request.target_params is not None:
        return search_shape(
            source,
            request.target_params,
            request.axes,
            request.count_embeddings,
            request.multiple_of or 1,
        ), None
    shape, dropped = source, None
    if request.drop_layers is not None:
        dropped = parse_layer_list(request.drop_layers, source.layers)
        if len(dropped) == source.layers:
            raise PruneError("--drop-layers: every layer dropped; keep at least one")
        shape = replace(shape, layers=source.layers - len(dropped))
    if request.layers is not None:
        _check_size("--layers", request.layers, source.layers, "layers")
        shape = replace(shape, layers=request.layers)
    kv = _kv_heads(source, request.heads, request.kv_heads)
    shape = replace(shape, kv_heads=kv, heads=kv * source.group)
    if request.mlp is not None:
        _check_size("--mlp", request.mlp, source.mlp, "MLP channels")
        shape = replace(shape, mlp=request.mlp)
    if request.hidden is not None:
        _check_size("--hidden", request.hidden, source.hidden, "hidden channels")
        shape = replace(shape, hidden=request.hidden)
    for option, width in (("--mlp", request.mlp), ("--hidden", request.hidden)):
        if request.multiple_of and width is not None and width % request.multiple_of:
            raise PruneError(
                f"{option} {width} is not a multiple of --multiple-of {request.multiple_of} "
                f"(e.g. GGUF Q8_0/Q4_0 blocks of 32); pass a multiple of {request.multiple_of}"
            )
    if shape.hidden % shape.heads:
        raise PruneError(
            f"--hidden {shape.hidden} is not divisible by the {shape.heads} kept heads "
            "(transformers requires hidden_size % num_attention_heads == 0); pass a multiple "
            f"of {shape.heads}"
        )
    return shape, dropped


def _check_size(option: str, value: int, available: int, what: str) -> None:
    if value < 1:
        raise PruneError(f"{option} {value}: must be at least 1")
    if value > available:
        raise PruneError(f"{option} {value}: the source has only {available} {what}")


def _kv_heads(source: Shape, heads: int | None, kv_heads: int | None) -> int:
    """KV heads to keep: heads go in whole GQA groups (a KV head with its query heads)."""
    kv = source.kv_heads
    if kv_heads is not None:
        _check_size("--kv-heads", kv_heads, source.kv_heads, "KV heads")
        kv = kv_heads
    if heads is not None:
        _check_size("--heads", heads, source.heads, "attention heads")
        if heads % source.group:
            raise PruneError(
                f"--heads {heads}: heads go in whole KV groups of {source.group} query heads "
                f"({source.heads} heads / {source.kv_heads} KV heads); pass a multiple of "
                f"{source.group}"
            )
        if kv_heads is not None and heads != kv_heads * source.group:
            raise PruneError(
                f"--heads {heads} with --kv-heads {kv_heads}: the {source.group}:1 grouping must "
                f"stay ({kv_heads * source.group} heads for {kv_heads} KV heads)"
            )
        kv = heads // source.group
    return kv


def search_shape(
    source: Shape,
    target: int,
    axes: tuple[str, ...],
    with_embeddings: bool,
    multiple_of: int = 1,
) -> Shape:
    """The most even shrink of the allowed axes whose count is within 1% of ``target``.

    Candidates: every layer count (depth), every KV-group count (heads, whole groups), MLP
    widths in :func:`multiple_for` steps, hidden widths that are multiples of 8 and of the head
    count, pruned widths also multiples of ``multiple_of`` (``--multiple-of``; a width kept
    whole is kept as it is) (transformers requires ``hidden_size % num_attention_heads == 0``). Among those within
    1% of ``target`` (or, if none, the closest), the one whose smallest kept fraction over the
    allowed axes is largest; then hidden widths that are multiples of 64; then the closest.
    """
    if not axes:
        raise PruneError("--axes: no axis allowed; name at least one of depth,heads,mlp,hidden")
    full = source.params(with_embeddings)
    if target >= full:
        raise PruneError(f"--target-params {target}: the source already has {full} (<= target)")

    def sizes(axis: str, size: int, step: int) -> list[int]:
        if axis not in axes:
            return [size]
        step = math.lcm(step, multiple_of)
        return sorted({*range(step, size + 1, step), size})

    names = {"depth": "layers", "heads": "kv_heads", "mlp": "mlp", "hidden": "hidden"}
    shrunk = [names[axis] for axis in axes]
    options = []
    for layers in sizes("depth", source.layers, 1):
        for kv in sizes("heads", source.kv_heads, 1):
            for mlp in sizes("mlp", source.mlp, multiple_for(source.mlp)):
                for hidden in sizes("hidden", source.hidden, 8):
                    if hidden % (kv * source.group):
                        continue
                    shape = replace(
                        source,
                        layers=layers,
                        kv_heads=kv,
                        heads=kv * source.group,
                        mlp=mlp,
                        hidden=hidden,
                    )
                    gap = abs(shape.params(with_embeddings) - target) / target
                    kept = min(getattr(shape, a) / getattr(source, a) for a in shrunk)
                    options.append((gap, kept, shape))
    closest = min(gap for gap, _, _ in options)
    eligible = [o for o in options if o[0] <= max(closest, 0.01)]
    return max(eligible, key=lambda o: (round(o[1], 2), o[2].hidden % 64 == 0, -o[0]))[2]


def pruned_config(config: dict[str, Any], shape: Shape) -> dict[str, Any]:
    """``config`` with the new shape (``head_dim`` always written: hidden and heads are free)."""
    new = dict(config)
    new.update(
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        intermediate_size=shape.mlp,
        hidden_size=shape.hidden,
    )
    for key in ("layer_types",):  # per-layer lists (transformers 5) follow the layer count
        if isinstance(new.get(key), list):
            new[key] = new[key][: shape.layers]
    return new
