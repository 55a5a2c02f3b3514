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


OPENMP_SPIN_ENV = "GOMP_SPINCOUNT"
OPENMP_SPIN_COUNT = "10000"


def _short_openmp_spins() -> str:
    """OpenMP threads that spin briefly before they sleep at a barrier: ``GOMP_SPINCOUNT=10000``
    (libgomp's default is 300,000) unless the environment sets it. Returns the value in force.

    PyTorch's CPU kernels run on libgomp, whose waiting threads spin before they sleep. Beside
    another busy process on the same cores (a shared node, a data worker, a second job) long
    spins burn the time slices the other process's threads need: on 2 cores beside a 2-thread
    training job a KD step slowed 5.4x and a CE-only step 3.0x with the default spin count,
    about 2.8x and 2.6x with 10,000, and alone both ran as fast as with the default (a passive
    wait policy, no spinning at all, was 13-26% slower alone: decoding's many small parallel
    regions pay for every wake-up). ``benchmarks/README.md``, "Under contention". libgomp
    reads the variable when it loads, i.e. when torch is first imported; the ``kdtune`` command
    imports this package first, so ``kdtune run`` and its torchrun workers (which inherit the
    environment) get it. A process that imported torch before kdtune (``tune run`` of a recipe
    file) keeps libgomp's default: export ``GOMP_SPINCOUNT=10000`` there.
    """
    return os.environ.setdefault(OPENMP_SPIN_ENV, OPENMP_SPIN_COUNT)


_short_openmp_spins()
