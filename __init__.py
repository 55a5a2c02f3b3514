"""kdtune: knowledge-distillation recipes for Llama-family models, in the style of torchtune.

The repository root is installed as this package (see ``pyproject.toml``):
``losses/`` is ``kdtune.losses``, ``recipes/`` is ``kdtune.recipes``, and so on.
"""

__version__ = "0.1.0"
