"""Tiny offline assets for tests and demos: tokenizer, teacher/student checkpoints, data.

``make_tiny_assets(out_dir, vocab="small" | "llama3", seed=0) -> TinyAssets`` builds (or reuses)
a folder; ``python -m kdtune.assets --out DIR`` does the same from a shell. Model builders for
YAML ``_component_`` live in :mod:`kdtune.assets.models`.
"""

from kdtune.assets.build import TinyAssets, make_tiny_assets

__all__ = ["TinyAssets", "make_tiny_assets"]
