"""A damaged teacher cache is named before training uses it: flipped bytes in a shard (caught
by the shard's SHA-256 when a batch first needs it), a truncated or missing shard and a broken
manifest (caught when the cache is opened); each error names the file and the command that
repairs the cache, and that command does repair it."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from kdtune.recipes.knowledge_distillation import KDRecipe
from kdtune.teacher_cache.build import BuildOptions, build_teacher_cache, shard_name
from kdtune.teacher_cache.reader import TeacherCache, TeacherCacheError
from kdtune.teacher_cache.source import open_for_training
from kdtune.training.config.errors import ConfigError
from kdtune.training.config.loading import load_config, resolve_config
from kdtune.training.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread_and_restored_torch_globals")

CACHED = "tiny/full_chunked_cached"
OPTIONS = BuildOptions(top_k=16, knots=16, samples_per_shard=64, batch_size=8)  # 5 shards


def cached_cfg(assets, folder: Path, *overrides: str) -> DictConfig:
    return load_config(
        resolve_config(CACHED), [f"assets_dir={assets.root}", f"teacher_cache={folder}", *overrides]
    )


@pytest.fixture(scope="module")
def built(tiny_assets, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("integrity") / "cache"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        build_teacher_cache(cached_cfg(tiny_assets, folder), OPTIONS)
    finally:
        torch.set_num_threads(threads)
    return folder


@pytest.fixture
def cache(built, tmp_path) -> Path:
    """A copy of the built cache to damage."""
    return Path(shutil.copytree(built, tmp_path / "cache"))


def tensor_span(path: Path, name: str) -> tuple[int, int]:
    """Byte range ``[start, end)`` of tensor ``name`` in a safetensors file, read from its
    header by the format's definition (8-byte little-endian header length, JSON header)."""
    data = path.read_bytes()
    (header_length,) = struct.unpack("<Q", data[:8])
    begin, end = json.loads(data[8 : 8 + header_length])[name]["data_offsets"]
    return 8 + header_length + begin, 8 + header_length + end


def flip_every_7th_values_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    start, end = tensor_span(path, "values")
    for offset in range(start, end, 7):
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def rebuild_hint(folder: Path) -> str:
    return f"kdtune cache-teacher --config <your config> teacher_cache={folder}`"


def train(cfg: DictConfig) -> None:
    recipe = KDRecipe(cfg)
    try:
        recipe.setup(cfg)
        recipe.train()
    finally:
        recipe.cleanup()


def test_flipped_bytes_stop_the_run_before_a_step_uses_them_and_the_build_repairs_them(
    cache, built, tiny_assets, tmp_path
):
    """The issue's case: every 7th byte of the values tensor flipped in every shard (same
    sizes, valid headers). Opening succeeds; the first batch stops the run naming a shard and
    the repairing command; no step is logged. Running that command restores the original."""
    originals = {p.name: p.read_bytes() for p in sorted(built.glob("shard_*.safetensors"))}
    for name in originals:
        flip_every_7th_values_byte(cache / name)
    assert all((cache / name).read_bytes() != data for name, data in originals.items())

    out = tmp_path / "out"
    cfg = cached_cfg(
        tiny_assets, cache, f"output_dir={out}", "validate_every_n_steps=null", "scan_dataset=false"
    )
    with pytest.raises(TeacherCacheError) as raised:
        train(cfg)
    message = str(raised.value)
    assert isinstance(raised.value, ConfigError)  # printed as one line by the CLI
    assert str(cache / "shard_") in message and "SHA-256" in message
    assert rebuild_hint(cache) in message and "\n" not in message
    assert read_metrics(out, "train") == []  # not one step trained

    build_teacher_cache(cached_cfg(tiny_assets, cache), OPTIONS)
    assert {name: (cache / name).read_bytes() for name in originals} == originals
    TeacherCache(cache).verify_all()


def test_a_lookup_verifies_only_the_shards_it_needs(cache, tiny_assets):
    """Damage in shard 3 does not stop a batch of samples of shard 0; a sample of shard 3 does."""
    flip_every_7th_values_byte(cache / shard_name(3))
    reader = TeacherCache(cache)
    reader.sample_rows(5)
    with pytest.raises(TeacherCacheError, match=shard_name(3)):
        reader.sample_rows(3 * 64 + 1)


def test_a_truncated_shard_is_named_when_the_cache_opens(cache, tiny_assets):
    path = cache / shard_name(2)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(TeacherCacheError) as raised:
        open_for_training(cached_cfg(tiny_assets, cache))
    message = str(raised.value)
    assert str(path) in message and "1000 bytes" in message and rebuild_hint(cache) in message


def test_a_missing_shard_is_named_when_the_cache_opens(cache, tiny_assets):
    (cache / shard_name(4)).unlink()
    with pytest.raises(TeacherCacheError) as raised:
        open_for_training(cached_cfg(tiny_assets, cache))
    message = str(raised.value)
    assert f"{cache / shard_name(4)} is missing" in message and rebuild_hint(cache) in message


def test_a_broken_manifest_is_named(cache, tiny_assets):
    manifest = cache / "manifest.json"
    manifest.write_text(manifest.read_text()[:200])
    with pytest.raises(ConfigError) as raised:
        open_for_training(cached_cfg(tiny_assets, cache))
    message = str(raised.value)
    assert f"{manifest} is not valid JSON" in message and rebuild_hint(cache) in message


def test_a_cache_without_shard_hashes_is_read_with_one_warning(cache, tiny_assets):
    manifest = json.loads((cache / "manifest.json").read_text())
    for record in manifest["shards"]:
        del record["sha256"]
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match="no recorded SHA-256") as warned:
        TeacherCache(cache).verify_all()
    assert len(warned) == 1
