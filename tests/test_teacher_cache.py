"""The teacher cache: encoding round trip, the builder (resume after a kill), rows against the
teacher itself, and the manifest check."""

from __future__ import annotations

import itertools
import json
import math
import multiprocessing
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig
from torchtune import config, training

from kdtune.teacher_cache.build import BUILD_STATS, BuildOptions, build_teacher_cache
from kdtune.teacher_cache.encoding import TopKCodec, knot_ranks, pack_ids, unpack_ids
from kdtune.teacher_cache.reader import TeacherCache
from kdtune.teacher_cache.source import open_for_training
from kdtune.teacher_cache.topk import topk_logprobs
from kdtune.training.config.errors import ConfigError
from kdtune.training.config.loading import load_config, resolve_config
from kdtune.training.data import (
    IndexedDataset,
    build_dataset,
    collate_with_sample_index,
    sft_collate,
    shift_labels,
)

LLAMA3_VOCAB = 128_256
IGNORE = -100

pytestmark = pytest.mark.usefixtures("one_thread_and_restored_torch_globals")


# --------------------------------------------------------------------------------------------
# Encoding (no models)


def reference_topk(logits: torch.Tensor, k: int, temperature: float):
    """Plain fp64 reference: sorted probabilities, the top k, and the mass of the rest."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    values, ids = probs.sort(dim=-1, descending=True)
    return ids[:, :k], values[:, :k].log(), values[:, k:].sum(-1).log()


def bucket_kl(p_log: torch.Tensor, p_rest: torch.Tensor, q_log: torch.Tensor, q_rest: torch.Tensor):
    """KL between two (k + 1)-bucket distributions given as log-probs (fp64), per row."""
    p = torch.cat([p_log, p_rest[:, None]], 1).double()
    q = torch.cat([q_log, q_rest[:, None]], 1).double()
    terms = p.exp() * (p - q)
    return torch.where(p.isneginf(), torch.zeros_like(terms), terms).sum(1)


def test_topk_logprobs_matches_a_plain_reference():
    torch.manual_seed(0)
    logits = 3 * torch.randn(7, 301)
    logits[0, :5] = 40.0 - 0.5 * torch.arange(
        5
    )  # the top ids hold almost all the mass: log(1 - sum) would cancel
    for k, temperature in ((1, 1.0), (17, 2.0), (301, 1.0)):
        ids, logprobs, rest = topk_logprobs(logits, k, temperature)
        ref_ids, ref_logprobs, ref_rest = reference_topk(logits, k, temperature)
        assert torch.equal(ids, ref_ids)
        torch.testing.assert_close(logprobs.double(), ref_logprobs, rtol=1e-5, atol=1e-5)
        if k == 301:
            assert rest.isneginf().all()
        else:
            torch.testing.assert_close(rest.double(), ref_rest, rtol=1e-4, atol=1e-5)
    assert topk_logprobs(logits, 5, 1.0)[2][0] < -30  # the tiny rest mass stays exact


@pytest.mark.parametrize("vocab,k", [(LLAMA3_VOCAB, 128), (3, 2), (2, 1), (1000, 7), (512, 512)])
def test_ids_are_bit_packed_exactly(vocab, k):
    generator = torch.Generator().manual_seed(vocab + k)
    ids = torch.randint(0, vocab, (33, k), generator=generator)
    ids[0, 0], ids[-1, -1] = 0, vocab - 1
    bits = math.ceil(math.log2(vocab)) if vocab > 1 else 1
    packed = pack_ids(ids, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (33, math.ceil(k * bits / 8))
    assert torch.equal(unpack_ids(packed, k, bits), ids)
    assert unpack_ids(pack_ids(ids[:0], bits), k, bits).shape == (0, k)


def test_storage_is_at_most_300_bytes_per_token_at_k128_on_llama3():
    codec = TopKCodec(k=128, vocab_size=LLAMA3_VOCAB)
    assert codec.bits == 17 and codec.id_bytes == 272
    assert codec.bytes_per_position == 272 + 2 * 13 == 298


def test_knot_ranks():
    for k, m in ((128, 12), (128, 13), (128, 2), (1000, 12), (20, 5), (5, 12), (1, 12)):
        ranks = knot_ranks(k, m)
        assert len(ranks) == min(k, m)
        assert ranks[0] == 1 and ranks[-1] == k
        assert all(a < b for a, b in itertools.pairwise(ranks))
    assert knot_ranks(128, 12)[:6] == [1, 2, 3, 4, 5, 6]  # the head is stored rank by rank


def _decode_round_trip(codec: TopKCodec, logits: torch.Tensor):
    ids, logprobs, rest = topk_logprobs(logits, codec.k, 1.0)
    decoded = codec.decode(*codec.encode(ids, logprobs, rest))
    return (ids, logprobs, rest), decoded


@pytest.mark.parametrize("k", [1, 2, 8, 12])
def test_round_trip_is_float16_exact_when_every_rank_is_a_knot(k):
    torch.manual_seed(k)
    logits = 4 * torch.randn(64, 384)
    (ids, logprobs, rest), (d_ids, d_logprobs, d_rest) = _decode_round_trip(
        TopKCodec(k, 384), logits
    )
    assert torch.equal(d_ids, ids)
    # float16 keeps 11 significant bits; renormalising moves every value by the same tiny shift
    tolerance = 2.0**-10 * (logprobs.abs().max() + 1)
    assert (d_logprobs - logprobs).abs().max() <= tolerance
    assert (d_rest - rest).abs().max() <= 2.0**-10 * (rest.abs().max() + 1)


def test_float32_values_round_trip_to_float32_precision():
    torch.manual_seed(1)
    codec = TopKCodec(8, 384, value_dtype="float32")
    assert codec.bytes_per_position == 9 + 4 * 9
    (ids, logprobs, rest), (d_ids, d_logprobs, d_rest) = _decode_round_trip(
        codec, 4 * torch.randn(16, 384)
    )
    assert torch.equal(d_ids, ids)
    torch.testing.assert_close(d_logprobs, logprobs, rtol=0, atol=1e-5)
    torch.testing.assert_close(d_rest, rest, rtol=0, atol=1e-5)


def test_lossy_round_trip_at_k128_stays_close_in_kl():
    """k = 128 > 12 knots on V = 128,256: the interpolated ranks cost little KL.

    Three synthetic shapes: Gaussian logits (scale 4: the top 128 hold ~0.8 of the mass),
    a noisy power law, and peaked Gaussian logits (scale 8: irregular gaps at the head).
    Measured with the default 12 knots: mean bucket KL 0.6e-3 to 1.4e-3 nats, max <= 0.014.
    """
    torch.manual_seed(0)
    vocab, rows = LLAMA3_VOCAB, 96
    power_law = -1.1 * torch.arange(1, vocab + 1).float().log()
    cases = {
        "gaussian": 4 * torch.randn(rows, vocab),
        "power_law": power_law * 2 * torch.rand(rows, 1) + 0.5 * torch.randn(rows, vocab),
        "peaked": 8 * torch.randn(rows, vocab),
    }
    codec = TopKCodec(128, vocab)
    for name, logits in cases.items():
        (ids, logprobs, rest), (d_ids, d_logprobs, d_rest) = _decode_round_trip(codec, logits)
        assert torch.equal(d_ids, ids)
        assert (d_logprobs[:, 1:] <= d_logprobs[:, :-1]).all(), name  # still sorted
        total = torch.logsumexp(torch.cat([d_logprobs, d_rest[:, None]], 1).double(), 1)
        assert total.abs().max() < 1e-5, name  # a distribution
        kl = bucket_kl(logprobs, rest, d_logprobs, d_rest)
        assert kl.mean() < 3e-3 and kl.max() < 0.05, (name, kl.mean(), kl.max())


def test_neg_inf_log_probs_survive_the_encoding():
    """Ids with probability 0 (-inf logits, e.g. a masked vocabulary) decode to -inf, no NaN.

    Between the last finite knot and a -inf knot the ranks decode to -inf too (the encoding
    cannot tell where the finite run ends); renormalising gives their little mass to the rest.
    """
    logits = torch.randn(4, 40)
    logits[:, 20:] = -math.inf
    for k, knots in ((40, 12), (30, 30)):
        codec = TopKCodec(k, 40, knots)
        (ids, _, _), (d_ids, d_logprobs, d_rest) = _decode_round_trip(codec, logits)
        assert torch.equal(d_ids[:, :20], ids[:, :20])
        assert not d_logprobs.isnan().any() and not d_rest.isnan().any()
        assert d_logprobs[:, 20:].isneginf().all() and d_rest.isneginf().all()
        finite_knots = [r - 1 for r in codec.knots if r <= 20]
        assert d_logprobs[:, finite_knots].isfinite().all()
        total = torch.logsumexp(torch.cat([d_logprobs, d_rest[:, None]], 1), 1)
        assert total.abs().max() < 1e-5


# --------------------------------------------------------------------------------------------
# Building a cache from the tiny assets


def tiny_cfg(assets, *overrides: str) -> DictConfig:
    return load_config(
        resolve_config("tiny/full_chunked"), [f"assets_dir={assets.root}", *overrides]
    )


# k = 16 with 16 knots: every value is stored (float16), so rows can be checked exactly.
OPTIONS = BuildOptions(top_k=16, knots=16, samples_per_shard=64, batch_size=8)


@pytest.fixture(scope="module")
def built(tiny_assets, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cache") / "k16"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        build_teacher_cache(tiny_cfg(tiny_assets, f"teacher_cache={folder}"), OPTIONS)
    finally:
        torch.set_num_threads(threads)
    return folder


def cache_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != BUILD_STATS}


def _build_and_get_killed(cfg: DictConfig, options: BuildOptions, after_shards: int) -> None:
    """In a forked child (no second start-up): SIGKILLed half-way through writing a shard."""
    os.environ["KDTUNE_TEST_KILL_CACHE_BUILD_AFTER_SHARDS"] = str(after_shards)
    build_teacher_cache(cfg, options)


def test_a_killed_build_resumes_to_the_same_cache(built, tiny_assets, tmp_path):
    folder = tmp_path / "killed"
    cfg = tiny_cfg(tiny_assets, f"teacher_cache={folder}")
    # Killed (SIGKILL) half-way through writing shard 2, after shards 0 and 1 were finished.
    child = multiprocessing.get_context("fork").Process(
        target=_build_and_get_killed, args=(cfg, OPTIONS, 2)
    )
    child.start()
    child.join(timeout=300)
    assert child.exitcode == -signal.SIGKILL
    names = {p.name for p in folder.iterdir()}
    assert "manifest.json" not in names
    assert {"shard_00000.safetensors.json", "shard_00001.safetensors.json"} <= names
    assert any(name.startswith(".shard_00002") for name in names)  # the torn temporary file
    # A finished shard whose bytes were damaged afterwards must be rebuilt, not kept.
    damaged = folder / "shard_00001.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-1] + b"\0")

    build_teacher_cache(tiny_cfg(tiny_assets, f"teacher_cache={folder}"), OPTIONS)
    stats = json.loads((folder / BUILD_STATS).read_text())
    assert stats["shards_built_last_run_rank0"] == 4  # shard 0 kept; 1 (damaged) to 4 built
    assert cache_files(folder) == cache_files(built)

    build_teacher_cache(tiny_cfg(tiny_assets, f"teacher_cache={folder}"), OPTIONS)
    assert json.loads((folder / BUILD_STATS).read_text())["shards_built_last_run_rank0"] == 0


def test_a_folder_with_another_build_is_refused(built, tiny_assets, tmp_path):
    folder = tmp_path / "other"
    shutil.copytree(built, folder)
    (folder / "manifest.json").unlink()
    cfg = tiny_cfg(tiny_assets, f"teacher_cache={folder}")
    with pytest.raises(ConfigError, match=r"other settings.*top_k"):
        build_teacher_cache(cfg, BuildOptions(top_k=8, samples_per_shard=64))


def _teacher(tiny_assets) -> torch.nn.Module:
    cfg = tiny_cfg(tiny_assets)
    model = config.instantiate(cfg.teacher_model).eval()
    state = config.instantiate(cfg.teacher_checkpointer, output_dir="/tmp/unused_kdtune_reader")
    model.load_state_dict(state.load_checkpoint()[training.MODEL_KEY])
    return model


def test_cached_rows_are_the_teachers_top_k_joined_by_sample_index(built, tiny_assets):
    """A shuffled, padded batch gets, at each target position, the teacher's own top-k."""
    cfg = tiny_cfg(tiny_assets)
    tokenizer = config.instantiate(cfg.tokenizer)
    dataset = IndexedDataset(build_dataset(cfg.dataset, tokenizer))
    collate = collate_with_sample_index(sft_collate(tokenizer.pad_id, IGNORE))
    samples = [250, 3, 64, 17]  # across shards, out of order
    batch = collate([dataset[i] for i in samples])
    assert batch["sample_index"].tolist() == samples
    labels = shift_labels(batch["labels"], IGNORE)
    assert (labels != IGNORE).sum() > 20

    cache = TeacherCache(built)
    cached = cache.lookup(batch["sample_index"], labels, IGNORE)
    assert cached.token_ids.shape == (*labels.shape, 16)
    assert cached.rest_logmass.shape == labels.shape

    with torch.no_grad():
        logits = _teacher(tiny_assets)(batch["tokens"])  # [B, S, V]
    mask = labels != IGNORE
    ids, logprobs, rest = reference_topk(logits[mask], 16, 1.0)
    got_ids = cached.token_ids[mask]
    # the same ids in the same order (ties between equal logits aside: none here)
    assert (got_ids == ids).float().mean() > 0.999
    tolerance = 2.0**-10 * (logprobs.abs().max() + 1)
    assert (cached.logprobs[mask].double() - logprobs).abs().max() <= tolerance
    assert (cached.rest_logmass[mask].double() - rest).abs().max() <= tolerance

    labels[1, mask[1].nonzero()[0, 0]] = IGNORE  # one target fewer than the cache holds
    with pytest.raises(ValueError, match=r"sample 3 has .* cached target positions"):
        cache.lookup(batch["sample_index"], labels, IGNORE)


def test_manifest_records_what_the_cache_is(built, tiny_assets):
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["top_k"] == 16 and manifest["vocab_size"] == 512
    max_seq_len = tiny_cfg(tiny_assets).tokenizer.max_seq_len
    assert manifest["identity"]["max_seq_len"] == max_seq_len
    assert manifest["identity"]["num_samples"] == sum(s["num_samples"] for s in manifest["shards"])
    assert manifest["bytes"] == sum((built / s["file"]).stat().st_size for s in manifest["shards"])
    for key in ("tokenizer", "dataset"):
        assert len(manifest["identity"][key]) == 64
    assert len(manifest["teacher"]) == 64


# --------------------------------------------------------------------------------------------
# A training config against the cache


def test_a_matching_config_opens_the_cache(built, tiny_assets):
    cfg = tiny_cfg(tiny_assets, f"teacher_cache={built}", "teacher_model=null")
    assert open_for_training(cfg).num_samples == 300


def test_mismatches_are_named(built, tiny_assets, tmp_path):
    def error(*overrides: str) -> str:
        cfg = tiny_cfg(tiny_assets, f"teacher_cache={built}", *overrides)
        with pytest.raises(ConfigError) as raised:
            open_for_training(cfg)
        return str(raised.value)

    built_with = tiny_cfg(tiny_assets).tokenizer.max_seq_len
    assert f"tokenizer.max_seq_len: cache {built_with}, config 32" in error(
        "tokenizer.max_seq_len=32"
    )
    assert "kd_loss.temperature: cache 1.0, config 2.0" in error("kd_loss.temperature=2.0")
    assert "vocab_columns" in error("kd_loss.vocab_columns=256")
    # same file names, other contents: the data and the tokenizer are compared by content
    moved = tmp_path / "assets"
    shutil.copytree(tiny_assets.root, moved)
    train = moved / "data" / "train.json"
    records = json.loads(train.read_text())
    records[0]["output"] += " and more"
    train.write_text(json.dumps(records))
    special = moved / "special_tokens.json"
    special.write_text(special.read_text() + "\n")
    message = error(f"assets_dir={moved}")
    assert "the training data" in message and "the tokenizer" in message
    assert "max_seq_len" not in message  # only what differs is named
    assert "kdtune cache-teacher" in error(f"teacher_cache={tmp_path / 'missing'}")


def test_cache_teacher_command_prints_bytes_per_token(tiny_assets, tmp_path, capsys, monkeypatch):
    from kdtune.cli.main import main as kdtune_main

    monkeypatch.chdir(tmp_path)  # the config's output_dir (./kdtune_outputs/...) is relative
    folder = tmp_path / "cli"
    argv = ["cache-teacher", "--config", "tiny/full_chunked", "--top_k", "4", "--knots", "2"]
    argv += ["--samples_per_shard", "300", f"assets_dir={tiny_assets.root}"]
    assert kdtune_main([*argv, f"teacher_cache={folder}"]) == 0
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["top_k"] == 4 and manifest["encoding"]["knot_ranks"] == [1, 4]
    per_position = math.ceil(4 * 9 / 8) + 2 * 3  # 9-bit ids, 2 knots + the rest mass
    assert manifest["encoding"]["bytes_per_position"] == per_position
    assert f"({per_position} per position" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli"]  # no empty output_dir left
