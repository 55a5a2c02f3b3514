"""The embedded default task: a synthetic corpus with known next-token distributions.

``kdtune demo`` (:func:`kdtune.demo.cli.demo_main`) distils the shipped teacher into a small
student on a stochastic word chain and prints a held-out quality table; ``kdtune eval``
(:func:`kdtune.demo.cli.eval_main`) computes that table for any checkpoints. Modules:

- :mod:`~kdtune.demo.task`: the chain, its sampler and its alpaca-style records;
- :mod:`~kdtune.demo.tokenizer`: tiktoken ranks with one token per word;
- :mod:`~kdtune.demo.metrics`: CE, true KL, KL to the teacher, top-1 at the task positions;
- :mod:`~kdtune.demo.evaluate`: loading checkpoints and scoring them on held-out answers;
- :mod:`~kdtune.demo.workspace`: the demo folder (task, data, teacher copy, student inits);
- :mod:`~kdtune.demo.runner`: the recipe run in-process, as ``kdtune run`` runs it;
- :mod:`~kdtune.demo.pipeline`: the demo itself; :mod:`~kdtune.demo.table`: the table;
- :mod:`~kdtune.demo.train_teacher`: how the shipped teacher (``teacher/``) was made.

See ``demo/README.md``.
"""
