"""``kdtune prune``: structured pruning of Llama-family HF folders (kdtune.pruning).

Tiny source folders are written here by transformers' own model classes (random weights at a
fan-in scale, so logits are far from uniform): Llama untied, Llama tied (SmolLM2's layout),
Qwen2 (q/k/v biases). Oracles are independent: transformers' forward, a forward written out in
this file, and the unpruned model with zeroed units.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from kdtune.models import llama_from_hf_folder, load_hf_folder
from kdtune.pruning import command as prune_command
from kdtune.pruning.apply import head_rows, prune_state_dict
from kdtune.pruning.command import choose, prune_folder
from kdtune.pruning.plan import (
    PruneError,
    Request,
    Shape,
    parse_axes,
    search_shape,
)
from kdtune.pruning.scores import score_model
from kdtune.training.model_facts import model_architecture

pytestmark = pytest.mark.usefixtures("one_thread_and_restored_torch_globals")

VOCAB = 512  # the tiny assets' model vocabulary: their tokenizer feeds calibration
DIMS = {"layers": 3, "hidden": 48, "heads": 6, "kv_heads": 3, "head_dim": 12, "mlp": 80}


def write_source(folder: Path, kind: str = "llama", seed: int = 0) -> Path:
    """A tiny HF folder made by transformers (``kind``: llama, llama_tied, qwen2).

    ``hidden`` (48) is not ``heads * head_dim`` (72): the builder must take head_dim as given;
    the width test prunes hidden to 36 with 4 heads (36 != 4 * 12).
    """
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(
        vocab_size=VOCAB,
        hidden_size=DIMS["hidden"],
        intermediate_size=DIMS["mlp"],
        num_hidden_layers=DIMS["layers"],
        num_attention_heads=DIMS["heads"],
        num_key_value_heads=DIMS["kv_heads"],
        head_dim=DIMS["head_dim"],
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=kind == "llama_tied",
    )
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, rope_theta=10_000.0))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common, rope_theta=100_000.0))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.2 * torch.randn(param.shape, generator=generator))
            else:
                fan_in = param.shape[-1] if param.dim() == 2 else 4
                param.copy_(torch.randn(param.shape, generator=generator) / math.sqrt(fan_in))
    model.save_pretrained(folder)
    return folder


def logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_hf_folder(folder)(tokens)


def transformers_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


TOKENS = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------------------------
# The builder


@pytest.mark.parametrize("kind", ["llama", "llama_tied", "qwen2"])
def test_builder_matches_transformers(tmp_path, kind):
    src = write_source(tmp_path / "src", kind)
    torch.testing.assert_close(
        logits(src, TOKENS), transformers_logits(src, TOKENS), rtol=0, atol=1e-4
    )


# ----------------------------------------------------------------------------------------------
# Exactness


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_pruning_nothing_is_bit_identical(tmp_path, kind):
    src = write_source(tmp_path / "src", kind)
    record = prune_folder(src, tmp_path / "dst", Request(), log=lambda _: None)
    assert torch.equal(logits(src, TOKENS), logits(tmp_path / "dst", TOKENS))
    before, after = (
        load_file(src / "model.safetensors"),
        load_file(tmp_path / "dst/model.safetensors"),
    )
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    written = json.loads((tmp_path / "dst/prune.json").read_text())
    assert written["kept"]["layers"] == [0, 1, 2] and record["source_sha256"]


def test_dropped_layers_compute_the_kept_layers(tmp_path):
    src = write_source(tmp_path / "src")
    prune_folder(src, tmp_path / "dst", Request(drop_layers="1"), log=lambda _: None)
    model = load_hf_folder(src)
    with torch.no_grad():  # the source's own modules, layer 1 skipped
        h = model.tok_embeddings(TOKENS)
        for index in (0, 2):
            h = model.layers[index](h)
        expected = model.output(model.norm(h))
    torch.testing.assert_close(logits(tmp_path / "dst", TOKENS), expected, rtol=0, atol=1e-6)
    assert json.loads((tmp_path / "dst/config.json").read_text())["num_hidden_layers"] == 2


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_zeroed_kv_groups_and_mlp_channels_prune_away_exactly(tmp_path, kind):
    """Zero one KV group (its query heads' q rows, k/v rows, o_proj columns) and 16 MLP channels
    (gate/up rows, down columns) per layer: their scores are 0, they are the ones chosen, and
    the pruned model computes the same logits."""
    src = write_source(tmp_path / "src", kind)
    state = load_file(src / "model.safetensors")
    group, hd = DIMS["heads"] // DIMS["kv_heads"], DIMS["head_dim"]
    zero_groups = {0: 1, 1: 0, 2: 2}
    zero_channels = {i: [5 * j + i for j in range(16)] for i in range(3)}
    for layer, g in zero_groups.items():
        prefix = f"model.layers.{layer}."
        q_rows, kv_rows = head_rows([g], group, hd), head_rows([g], 1, hd)
        for name in ("q_proj.weight", "q_proj.bias"):
            if prefix + "self_attn." + name in state:
                state[prefix + "self_attn." + name][q_rows] = 0
        for proj in ("k_proj", "v_proj"):
            for name in (f"{proj}.weight", f"{proj}.bias"):
                if prefix + "self_attn." + name in state:
                    state[prefix + "self_attn." + name][kv_rows] = 0
        state[prefix + "self_attn.o_proj.weight"][:, q_rows] = 0
        channels = zero_channels[layer]
        state[prefix + "mlp.gate_proj.weight"][channels] = 0
        state[prefix + "mlp.up_proj.weight"][channels] = 0
        state[prefix + "mlp.down_proj.weight"][:, channels] = 0
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})

    config = json.loads((src / "config.json").read_text())
    source = Shape.of(config)
    scores = score_model(load_hf_folder(src), [TOKENS], source.kv_heads)
    for layer, g in zero_groups.items():
        assert scores.groups[layer, g] == 0
        assert (scores.mlp[layer, zero_channels[layer]] == 0).all()
    from dataclasses import replace

    shape = replace(source, kv_heads=2, heads=4, mlp=64)
    keep = choose(source, shape, None, scores)
    for layer, g in zero_groups.items():
        assert keep.groups[layer] == sorted(set(range(3)) - {g})
        assert keep.mlp[layer] == sorted(set(range(80)) - set(zero_channels[layer]))
    pruned = prune_state_dict(state, keep, group, hd)
    dst = tmp_path / "dst"
    dst.mkdir()
    save_file(pruned, str(dst / "model.safetensors"))
    new_config = {**config, "num_attention_heads": 4, "num_key_value_heads": 2}
    (dst / "config.json").write_text(json.dumps({**new_config, "intermediate_size": 64}))
    torch.testing.assert_close(logits(dst, TOKENS), logits(src, TOKENS), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Scores against a forward written out here


def test_scores_equal_a_brute_force_reference(tmp_path):
    src = write_source(tmp_path / "src")
    model = load_hf_folder(src, dtype=torch.float64)
    batches = [TOKENS, TOKENS.flip(1)]
    scores = score_model(model, batches, DIMS["kv_heads"])

    H, K, hd = DIMS["heads"], DIMS["kv_heads"], DIMS["head_dim"]
    L, M, D = DIMS["layers"], DIMS["mlp"], DIMS["hidden"]
    tokens = torch.cat(batches)
    B, S = tokens.shape
    influence = torch.zeros(L, dtype=torch.float64)
    heads = torch.zeros(L, H, dtype=torch.float64)
    mlp = torch.zeros(L, M, dtype=torch.float64)
    hidden = torch.zeros(D, dtype=torch.float64)

    def l2_over_positions_mean_over_samples(x):  # [B, S] -> scalar, by loops
        return sum(math.sqrt(sum(x[b, s].item() ** 2 for s in range(S))) for b in range(B)) / B

    def add_hidden(normed):
        for c in range(D):
            hidden[c] += l2_over_positions_mean_over_samples(normed[:, :, c].abs())

    causal = torch.ones(S, S, dtype=torch.bool).tril()
    with torch.no_grad():
        h = model.tok_embeddings(tokens)
        for i, layer in enumerate(model.layers):
            attn = layer.attn
            x = layer.sa_norm(h)
            add_hidden(x)
            q = attn.pos_embeddings(attn.q_proj(x).view(B, S, H, hd))
            k = attn.pos_embeddings(attn.k_proj(x).view(B, S, K, hd))
            v = attn.v_proj(x).view(B, S, K, hd)
            out = torch.zeros(B, S, H, hd, dtype=torch.float64)
            for head in range(H):
                kv = head // (H // K)
                logits_ = torch.einsum("bqd,bkd->bqk", q[:, :, head], k[:, :, kv]) / math.sqrt(hd)
                weights = logits_.masked_fill(~causal, float("-inf")).softmax(-1)
                out[:, :, head] = torch.einsum("bqk,bkd->bqd", weights, v[:, :, kv])
                heads[i, head] = l2_over_positions_mean_over_samples(out[:, :, head].norm(dim=-1))
            mid = h + attn.output_proj(out.reshape(B, S, H * hd))
            y = layer.mlp_norm(mid)
            add_hidden(y)
            act = F.silu(layer.mlp.w1(y)) * layer.mlp.w3(y)
            for c in range(M):
                mlp[i, c] = l2_over_positions_mean_over_samples(act[:, :, c].abs())
            new_h = mid + layer.mlp.w2(act)
            torch.testing.assert_close(new_h, layer(h))  # the written-out forward is the model's
            cos = [
                F.cosine_similarity(h[b, s], new_h[b, s], dim=0).item()
                for b in range(B)
                for s in range(S)
            ]
            influence[i] = 1 - sum(cos) / len(cos)
            h = new_h
        add_hidden(model.norm(h))

    torch.testing.assert_close(scores.layers, influence)
    torch.testing.assert_close(scores.heads, heads)
    torch.testing.assert_close(scores.groups, heads.view(L, K, H // K).sum(-1))
    torch.testing.assert_close(scores.mlp, mlp)
    torch.testing.assert_close(scores.hidden, hidden)
    assert scores.tokens == B * S


# ----------------------------------------------------------------------------------------------
# Width pruning end to end: calibration from a config's dataset, three readers agree


@pytest.mark.parametrize("kind", ["llama", "llama_tied", "qwen2"])
def test_width_pruned_folder_loads_the_same_in_transformers_torchtune_and_kdtune(
    tmp_path, tiny_assets, kind
):
    from torchtune.training import FullModelHFCheckpointer

    src = write_source(tmp_path / "src", kind)
    (src / "tokenizer_config.json").write_text("{}")
    dst = tmp_path / "dst"
    record = prune_folder(
        src,
        dst,
        Request(layers=2, heads=4, mlp=40, hidden=36),
        config="tiny/full_chunked",
        overrides=[f"assets_dir={tiny_assets.root}"],
        samples=4,
        seq_len=16,
        log=lambda _: None,
    )
    config = json.loads((dst / "config.json").read_text())
    assert (config["num_hidden_layers"], config["num_attention_heads"]) == (2, 4)
    assert (config["num_key_value_heads"], config["head_dim"]) == (2, DIMS["head_dim"])
    assert (config["intermediate_size"], config["hidden_size"]) == (40, 36)
    assert (dst / "tokenizer_config.json").is_file()
    assert record["params"]["total"] == sum(
        t.numel() for t in load_file(dst / "model.safetensors").values()
    )

    expected = transformers_logits(dst, TOKENS)
    torch.testing.assert_close(logits(dst, TOKENS), expected, rtol=0, atol=1e-4)
    model_type = {"llama": "LLAMA3", "llama_tied": "LLAMA3_2", "qwen2": "QWEN2"}[kind]
    checkpointer = FullModelHFCheckpointer(
        checkpoint_dir=str(dst),
        checkpoint_files=["model.safetensors"],
        model_type=model_type,
        output_dir=str(tmp_path / "out"),
    )
    model = llama_from_hf_folder(dst)
    # the recipe's preflight compares these with config.json (training.model_facts)
    assert model_architecture(model) == {k: config[k] for k in model_architecture(model)}
    model.load_state_dict(checkpointer.load_checkpoint()["model"])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(TOKENS), expected, rtol=0, atol=1e-4)


def test_dry_run_prints_scores_and_writes_nothing(tmp_path, tiny_assets, capsys):
    src = write_source(tmp_path / "src")
    prune_folder(
        src,
        tmp_path / "dst",
        Request(
            target_params=Shape.of(json.loads((src / "config.json").read_text())).params(False) // 2
        ),
        config="tiny/full_chunked",
        overrides=[f"assets_dir={tiny_assets.root}"],
        samples=2,
        seq_len=16,
        dry_run=True,
    )
    out = capsys.readouterr().out
    assert "block-influence" in out and "hidden channels, top 8" in out and "params:" in out
    assert not (tmp_path / "dst").exists()


def test_target_params_choose_valid_sizes_near_the_target():
    smollm2 = Shape(30, 9, 3, 64, 1536, 576, 49152, True, False)
    target = smollm2.params(embeddings=False) // 2
    for axes in ("width", "depth", "depth,width", "heads,mlp"):
        shape = search_shape(smollm2, target, parse_axes(axes), False)
        assert abs(shape.params(embeddings=False) - target) / target < 0.02, axes
        assert shape.head_dim == 64 and shape.heads == 3 * shape.kv_heads
        assert shape.hidden % 8 == 0 and shape.hidden % shape.heads == 0 and shape.mlp % 64 == 0
        if "depth" not in axes:
            assert shape.layers == 30
        if "hidden" not in parse_axes(axes):
            assert shape.hidden == 576


def test_multiple_of_keeps_widths_exportable_to_gguf_blocks():
    smollm2 = Shape(30, 9, 3, 64, 1536, 576, 49152, True, False)
    target = smollm2.params(embeddings=False) // 2
    free = search_shape(smollm2, target, parse_axes("width"), False)
    assert free.hidden % 32  # 432 today: not a whole number of 32-blocks
    shape = search_shape(smollm2, target, parse_axes("width"), False, multiple_of=32)
    assert shape.hidden % 32 == 0 and shape.mlp % 32 == 0 and shape.hidden % shape.heads == 0
    assert abs(shape.params(embeddings=False) - target) / target < 0.02


# ----------------------------------------------------------------------------------------------
# Errors: one line, before anything is loaded


@pytest.fixture
def nothing_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("weights or data were loaded before the request was checked")

    for name in ("load_hf_folder", "read_state", "calibration_batches"):
        monkeypatch.setattr(prune_command, name, refuse)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (Request(heads=8), "--heads 8: the source has only 6"),
        (Request(kv_heads=4), "--kv-heads 4: the source has only 3"),
        (Request(heads=3), "whole KV groups of 2"),
        (Request(heads=4, kv_heads=1), "grouping must stay"),
        (Request(mlp=81), "--mlp 81: the source has only 80"),
        (Request(hidden=0), "--hidden 0: must be at least 1"),
        (Request(hidden=42, heads=4), "--hidden 42 is not divisible by the 4 kept heads"),
        (Request(layers=4), "--layers 4: the source has only 3"),
        (Request(drop_layers="2-1"), "reversed"),
        (Request(drop_layers="0,0-1"), "names a layer twice"),
        (Request(drop_layers=""), "is not N or N-M"),
        (Request(drop_layers="0-2"), "every layer dropped"),
        (Request(drop_layers="5"), "outside layers 0..2"),
        (Request(layers=2), "needs calibration samples: pass --config"),
        (Request(target_params=10**12), "already has"),
        (Request(target_params=1000, layers=2), "drop --layers"),
        (Request(hidden=40, multiple_of=32), "--hidden 40 is not a multiple of --multiple-of 32"),
        (Request(mlp=40, multiple_of=32), "--mlp 40 is not a multiple of --multiple-of 32"),
        (Request(multiple_of=0), "--multiple-of 0: must be at least 1"),
    ],
)
def test_impossible_requests_fail_before_loading(tmp_path, nothing_loads, request_, message):
    src = write_source(tmp_path / "src")
    with pytest.raises(PruneError, match=message) as error:
        prune_folder(src, tmp_path / "dst", request_)
    assert "\n" not in str(error.value)


def test_bad_folders_fail_before_loading(tmp_path, nothing_loads):
    src = write_source(tmp_path / "src")
    with pytest.raises(PruneError, match="is SRC or inside it"):
        prune_folder(src, src, Request())
    with pytest.raises(PruneError, match="is SRC or inside it"):
        prune_folder(src, src / "sub", Request())
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(PruneError, match="not empty"):
        prune_folder(src, tmp_path / "full", Request())
    with pytest.raises(PruneError, match=r"no config\.json"):
        prune_folder(tmp_path / "full", tmp_path / "dst", Request())
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(PruneError, match=r"no \*\.safetensors"):
        prune_folder(bare, tmp_path / "dst", Request())
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(PruneError, match="not a Llama-family causal LM"):
        prune_folder(src, tmp_path / "dst", Request())
    odd = {**config, "num_attention_heads": 5, "num_key_value_heads": 5}
    (src / "config.json").write_text(json.dumps(odd))
    with pytest.raises(
        PruneError, match="hidden_size 48 is not divisible by num_attention_heads 5"
    ):
        prune_folder(src, tmp_path / "dst", Request())
    (src / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 4}))
    with pytest.raises(PruneError, match="not a multiple of num_key_value_heads 4"):
        prune_folder(src, tmp_path / "dst", Request())


def test_cli_error_is_one_line_exit_2(tmp_path, capsys):
    from kdtune.cli.main import main

    src = write_source(tmp_path / "src")
    capsys.readouterr()  # transformers' save progress bar
    assert main(["prune", str(src), str(tmp_path / "dst"), "--drop-layers", "3-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --drop-layers") and "\n" not in err
    assert main(["prune", str(src), str(tmp_path / "dst"), "--drop-layers", "1"]) == 0
    assert json.loads((tmp_path / "dst/config.json").read_text())["num_hidden_layers"] == 2
