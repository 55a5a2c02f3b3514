"""Layer pruning: a student made of chosen layers of a teacher, as a Hugging Face folder.

Keeping whole decoder layers (and the embeddings, final norm, tokenizer) gives a student that
shares the teacher's tokenizer and width, the usual start for prune-then-distil (Minitron).
Works on any Llama-family HF folder (``model.layers.N.*`` weight names).

::

    python -m kdtune.smollm2 prune SRC DST --keep 0-4,20-29
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
COPIED = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "generation_config.json",
    "special_tokens_map.json",
)


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
        layers.extend(range(first, last + 1))
    return layers


def first_and_last(num_layers: int, first: int, last: int) -> list[int]:
    """The first ``first`` and last ``last`` layers (the demo keeps 5 + 10 of 30)."""
    return [*range(first), *range(num_layers - last, num_layers)]


def prune_layers(src: Path, dst: Path, keep: list[int]) -> Path:
    """Write ``dst``: ``src``'s weights with only the layers ``keep`` (renumbered 0..K-1).

    Raises ``ValueError`` naming the problem for an empty, repeated, unsorted or out-of-range
    ``keep``.
    """
    config = json.loads((src / "config.json").read_text())
    num_layers = config["num_hidden_layers"]
    if not keep:
        raise ValueError("keep: no layers given")
    if sorted(set(keep)) != keep:
        raise ValueError(f"keep: {keep} must be increasing without repeats")
    if keep[0] < 0 or keep[-1] >= num_layers:
        raise ValueError(f"keep: {keep} has layers outside 0..{num_layers - 1}")
    new_index = {old: new for new, old in enumerate(keep)}
    state = {}
    for file in sorted(src.glob("*.safetensors")):
        for name, tensor in load_file(str(file)).items():
            match = LAYER_KEY.match(name)
            if match is None:
                state[name] = tensor
            elif int(match.group(1)) in new_index:
                state[f"model.layers.{new_index[int(match.group(1))]}.{match.group(2)}"] = tensor
    dst.mkdir(parents=True, exist_ok=True)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config["num_hidden_layers"] = len(keep)
    config["kdtune_pruned_from"] = {"layers_kept": keep, "num_layers": num_layers}
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in COPIED:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    return dst
