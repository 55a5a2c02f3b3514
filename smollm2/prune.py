"""Layer pruning: a student made of chosen layers of a teacher, as a Hugging Face folder.

Keeping whole decoder layers (and the embeddings, final norm, tokenizer) gives a student that
shares the teacher's tokenizer and width, the usual start for prune-then-distil (Minitron).
Works on any Llama-family HF folder; ``kdtune prune`` (:mod:`kdtune.pruning`) does the work and
also prunes heads, MLP and hidden channels by importance.

::

    python -m kdtune.smollm2 prune SRC DST --keep 0-4,20-29
    kdtune prune SRC DST --drop-layers 5-19                  (the same student)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from kdtune.pruning.command import prune_folder
from kdtune.pruning.plan import Request


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """``"0-4,20-29"`` -> ``[0, ..., 4, 20, ..., 29]``; negative numbers count from the end."""
    layers: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        match = re.fullmatch(r"(-?\d+)(?:-(-?\d+))?", part)
        if not match:
            raise ValueError(f"--keep: {part!r} is not N or N-M (e.g. --keep 0-4,20-29)")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        first, last = (n + num_layers if n < 0 else n for n in (first, last))
        if last < first:
            raise ValueError(f"--keep: range {part!r} is reversed; write it low-high (e.g. 1-3)")
        layers.extend(range(first, last + 1))
    return layers


def first_and_last(num_layers: int, first: int, last: int) -> list[int]:
    """The first ``first`` and last ``last`` layers (the demo keeps 5 + 10 of 30)."""
    return [*range(first), *range(num_layers - last, num_layers)]


def prune_layers(src: Path, dst: Path, keep: list[int]) -> Path:
    """Write ``dst``: ``src``'s weights with only the layers ``keep`` (renumbered 0..K-1),
    through :func:`kdtune.pruning.command.prune_folder` (``kdtune prune --drop-layers``).

    Raises ``ValueError`` naming the problem for an empty, repeated, unsorted or out-of-range
    ``keep``.
    """
    num_layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    if not keep:
        raise ValueError("keep: no layers given")
    if sorted(set(keep)) != keep:
        raise ValueError(f"keep: {keep} must be increasing without repeats")
    if keep[0] < 0 or keep[-1] >= num_layers:
        raise ValueError(f"keep: {keep} has layers outside 0..{num_layers - 1}")
    dropped = [i for i in range(num_layers) if i not in keep]
    request = Request(drop_layers=",".join(map(str, dropped)) if dropped else None)
    prune_folder(src, dst, request, command=f"prune_layers(keep={keep})", log=lambda _: None)
    return dst
