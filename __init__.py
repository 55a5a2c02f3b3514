"""kdtune: knowledge-distillation recipes for Llama-family models, in the style of torchtune.

The repository root is installed as this package (see ``pyproject.toml``):
``losses/`` is ``kdtune.losses``, ``recipes/`` is ``kdtune.recipes``, and so on.
"""

import logging
import os

__version__ = "0.1.0"


class _DropTorchaoExtensionNotice(logging.Filter):
    """torchao 0.15 warns at import that its C++ extensions do not match torch 2.13.

    kdtune uses only torchao's pure-PyTorch int8 weight-only path, so the notice is noise in
    every command's output; every other torchao message passes.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "Skipping import of cpp extensions" not in record.getMessage()


logging.getLogger("torchao").addFilter(_DropTorchaoExtensionNotice())


THP_ENV = "THP_MEM_ALLOC_ENABLE"
"""PyTorch's switch (``c10/core/impl/alloc_cpu.cpp``) for huge-page CPU allocations."""


def use_huge_pages_for_large_tensors() -> str:
    """Put large CPU tensors on transparent huge pages: set ``THP_MEM_ALLOC_ENABLE=1`` unless
    the environment sets it (``0`` keeps PyTorch's default). Returns the value in force.

    A training step on CPU makes many large tensors every step (logit chunks, weight-sized
    gradients, fake-quantised weights); glibc gives each one above 32 MiB a fresh ``mmap`` and
    unmaps it on free, so the kernel faults in and zeroes its pages again every step, 4 KiB per
    fault. PyTorch's CPU allocator can instead align such tensors to 2 MiB and
    ``madvise(MADV_HUGEPAGE)`` them: 512x fewer faults for the same memory (a 64 MiB
    make-fill-free cycle 72 -> 26 ms on these 2 cores, with a lower peak resident set;
    tests/test_cpu_memory.py counts the faults). PyTorch reads the variable once, at the
    process's first CPU allocation; every kdtune process (the ``kdtune`` command, ``tune run``
    of a recipe file, torchrun's workers) imports this package before that, so this runs at
    import. A script that made a tensor before importing kdtune keeps PyTorch's default; a
    kernel with transparent huge pages off (``/sys/kernel/mm/transparent_hugepage/enabled``:
    ``never``) and CUDA memory are unaffected.
    """
    return os.environ.setdefault(THP_ENV, "1")


use_huge_pages_for_large_tensors()
