"""Minitron-style structured pruning of Llama-family HF folders (``kdtune prune``).

:mod:`~kdtune.pruning.plan` checks the request and chooses sizes (before anything is loaded),
:mod:`~kdtune.pruning.scores` measures importance on calibration samples,
:mod:`~kdtune.pruning.apply` slices the weights and writes the new folder,
:mod:`~kdtune.pruning.command` is the command line.
"""
