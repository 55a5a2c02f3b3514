"""What the KD recipe calls to train from a cache instead of a teacher model.

Three call sites in the recipe::

    cache = open_for_training(cfg)                # setup, before any model is built
    # (the training loader's batches carry their sample_index: kdtune.training.data)
    teacher = teacher_view(teacher, cache, batch, shifted_labels, ignore_index)  # per micro-batch

With ``teacher_cache: null`` the recipe is unchanged (``teacher_view`` returns the model).
"""

from __future__ import annotations

from omegaconf import DictConfig
from torch import Tensor, nn
from torch.utils.data import Dataset

from kdtune.teacher_cache.manifest import check_manifest, data_identity, kd_options, read_manifest
from kdtune.teacher_cache.reader import TeacherCache
from kdtune.teacher_cache.topk import TopKTeacher
from kdtune.training.config.errors import ConfigError
from kdtune.training.data import SAMPLE_INDEX
from kdtune.training.model_facts import describe_model


def open_for_training(cfg: DictConfig) -> TeacherCache | None:
    """The config's ``teacher_cache``, checked against the config; None without one.

    Compares the manifest with the tokenizer (files and options), the training data (dataset
    node and data file contents), ``max_seq_len``, ``kd_loss.temperature`` /
    ``ignore_index`` and the vocabulary (``kd_loss.vocab_columns``, else the student's), before
    any model is built (the student's vocabulary comes from a meta-device build). The number of
    samples is compared once the data is loaded (:func:`check_num_samples`).

    Raises:
        ConfigError: no (complete) cache in the folder, a broken manifest, a missing or
            truncated shard (named, with the repairing command), or a cache built for
            something else (the message names every difference). Shard contents are checked
            against their SHA-256 when a batch first needs them
            (:class:`~kdtune.teacher_cache.reader.TeacherCache`).
    """
    folder = cfg.get("teacher_cache")
    if folder is None:
        return None
    manifest = read_manifest(folder)
    expected = data_identity(cfg, num_samples=manifest["identity"]["num_samples"])
    columns = kd_options(cfg)["vocab_columns"]
    expected["vocab_size"] = int(columns or describe_model(cfg.model).vocab_size)
    check_manifest(manifest, expected, folder)
    return TeacherCache(folder)


def check_num_samples(cache: TeacherCache | None, dataset: Dataset) -> None:
    """The training data has as many samples as the cache (raised before training)."""
    if cache is None:
        return
    cached, actual = cache.manifest["identity"]["num_samples"], len(dataset)  # type: ignore[arg-type]
    if cached != actual:
        raise ConfigError(
            f"teacher_cache = {str(cache.folder)!r} holds {cached} samples but the training data "
            f"has {actual}: rebuild it with `kdtune cache-teacher` for this data"
        )


def teacher_view(
    teacher: nn.Module | None,
    cache: TeacherCache | None,
    batch: dict[str, Tensor],
    shifted_labels: Tensor,
    ignore_index: int,
) -> nn.Module | TopKTeacher | None:
    """What the loss step gets as its teacher: the model, or the batch's cached top-k rows."""
    if cache is None:
        return teacher
    return cache.lookup(batch[SAMPLE_INDEX], shifted_labels, ignore_index)
