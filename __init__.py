"""kdtune: knowledge-distillation recipes for Llama-family models, in the style of torchtune.

The repository root is installed as this package (see ``pyproject.toml``):
``losses/`` is ``kdtune.losses``, ``recipes/`` is ``kdtune.recipes``, and so on.
"""

import logging

__version__ = "0.1.0"


class _DropTorchaoExtensionNotice(logging.Filter):
    """torchao 0.15 warns at import that its C++ extensions do not match torch 2.13.

    kdtune uses only torchao's pure-PyTorch int8 weight-only path, so the notice is noise in
    every command's output; every other torchao message passes.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "Skipping import of cpp extensions" not in record.getMessage()


logging.getLogger("torchao").addFilter(_DropTorchaoExtensionNotice())
