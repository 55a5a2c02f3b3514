"""Offline teacher: cache the teacher's top-k log-probs once, distil without a teacher in memory.

- :mod:`~kdtune.teacher_cache.build`: ``kdtune cache-teacher`` (writer: shards, resume, manifest);
- :mod:`~kdtune.teacher_cache.reader`: :class:`~kdtune.teacher_cache.reader.TeacherCache`
  (memory-mapped rows, looked up by sample index);
- :mod:`~kdtune.teacher_cache.encoding`: the on-disk encoding of one position;
- :mod:`~kdtune.teacher_cache.manifest`: fingerprints and the config check;
- :mod:`~kdtune.teacher_cache.source`: the recipe's three call sites.
"""
