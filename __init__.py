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


OPENMP_WAIT_ENV = "OMP_WAIT_POLICY"


def _passive_openmp_waits() -> str:
    """OpenMP threads that sleep when they wait: ``OMP_WAIT_POLICY=PASSIVE`` unless the
    environment sets it. Returns the value in force.

    PyTorch's CPU kernels run on libgomp, whose default makes a thread that reaches a barrier
    spin before it sleeps. Beside another busy process on the same cores (a shared node, a data
    worker, a second job) those spins burn the time slices the other threads need: on 2 cores
    beside a 2-thread training job a KD step slowed 5.4x and a CE-only step 3.0x with the
    default, 1.7x and 2.0x with passive waits, and alone both ran as fast as before
    (``benchmarks/results/real_cpu_contention*.md``). libgomp reads the variable when it loads,
    i.e. when torch is first imported; the ``kdtune`` command imports this package first, so
    ``kdtune run`` (and its torchrun workers, which inherit the environment) get it. A process
    that imported torch before kdtune (``tune run`` of a recipe file) keeps libgomp's default:
    export ``OMP_WAIT_POLICY=PASSIVE`` there.
    """
    return os.environ.setdefault(OPENMP_WAIT_ENV, "PASSIVE")


_passive_openmp_waits()
