"""The embedded demo: shipped teacher, demo folder, ``kdtune eval`` and a short end-to-end run."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict

import pytest
import torch
from safetensors import safe_open

from kdtune.demo.cli import _split_overrides, eval_main, eval_parser
from kdtune.demo.evaluate import evaluate_checkpoints, load_model
from kdtune.demo.models import DEMO_VOCAB_SIZE, TEACHER_DIMS
from kdtune.demo.pipeline import KD_CONFIG, run_demo, run_overrides, variants
from kdtune.demo.runner import demo_config
from kdtune.demo.tokenizer import tokenizer_sha256
from kdtune.demo.train_teacher import TEACHER_CONFIG, setup_teacher_workspace
from kdtune.demo.workspace import (
    DEFAULT_SPEC,
    SHIPPED_TEACHER_DIR,
    prepare_workspace,
    read_teacher_manifest,
)
from kdtune.training.config_checks import check_config

NUM_HELD_OUT = 150  # a slice of the held-out answers keeps these tests fast


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as ``kdtune demo`` uses (fast on a busy machine), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def demo_ws(tmp_path_factory):
    """A demo folder (seeds 0 and 1) plus a short held-out file next to the full one."""
    ws, _ = prepare_workspace(tmp_path_factory.mktemp("demo"), seeds=[0, 1])
    records = json.loads(ws.val_data.read_text())[:NUM_HELD_OUT]
    (ws.root / "data" / "val_small.json").write_text(json.dumps(records))
    return ws


def _overrides(ws) -> list[str]:
    return [f"assets_dir={ws.root}", f"validation_dataset.data_files={ws.root}/data/val_small.json"]


def test_shipped_teacher_was_trained_on_this_task():
    manifest = read_teacher_manifest()
    assert manifest["spec"] == asdict(DEFAULT_SPEC)
    assert manifest["tokenizer_sha256"] == tokenizer_sha256(DEFAULT_SPEC.make_task())
    assert "python -m kdtune.demo.train_teacher" in manifest["command"]
    hf_config = json.loads((SHIPPED_TEACHER_DIR / "config.json").read_text())
    assert hf_config["num_hidden_layers"] == TEACHER_DIMS.num_layers
    assert hf_config["hidden_size"] == TEACHER_DIMS.embed_dim
    assert hf_config["vocab_size"] == DEMO_VOCAB_SIZE
    weights = SHIPPED_TEACHER_DIR / "model.safetensors"
    assert weights.stat().st_size < 8 * 2**20  # tiny enough to ship in the package
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == manifest["weights_sha256"]
    with safe_open(str(weights), framework="pt") as f:
        assert f.get_slice("lm_head.weight").get_shape() == [
            DEMO_VOCAB_SIZE,
            TEACHER_DIMS.embed_dim,
        ]


def test_shipped_teacher_is_far_closer_to_the_truth_than_an_untrained_student(demo_ws):
    cfg = demo_config(KD_CONFIG, _overrides(demo_ws))
    load_model(cfg.teacher_model, demo_ws.teacher_dir)  # strict load into the YAML's builder
    rows = evaluate_checkpoints(
        cfg, {"before": demo_ws.student_init_dir(0)}, teacher=demo_ws.teacher_dir
    )
    assert rows["teacher"]["true_kl"] < 0.2
    assert rows["teacher"]["true_kl"] < rows["before"]["true_kl"] / 10
    assert rows["teacher"]["teacher_kl"] == pytest.approx(0.0, abs=1e-9)
    assert rows["truth"]["true_kl"] == pytest.approx(0.0, abs=1e-9)
    assert rows["truth"]["top1"] == 1.0


def test_demo_folder_is_deterministic_and_reused(tmp_path):
    first, reused = prepare_workspace(tmp_path / "a", seeds=[3])
    assert not reused
    assert prepare_workspace(tmp_path / "a", seeds=[3])[1]  # unchanged: reused
    other, _ = prepare_workspace(tmp_path / "b", seeds=[3])
    for relative in ("task.json", "tokenizer/tokenizer.model", "data/train.json",
                     "data/val.json", "students/init_seed3/model.safetensors"):  # fmt: skip
        assert (first.root / relative).read_bytes() == (other.root / relative).read_bytes()
    (first.root / "data" / "train.json").write_text("[]")  # damaged: rebuilt, not reused
    assert not prepare_workspace(tmp_path / "a", seeds=[3])[1]
    assert (first.root / "data" / "train.json").read_bytes() == (
        other.root / "data" / "train.json"
    ).read_bytes()
    assert prepare_workspace(tmp_path / "a", seeds=[4])[1]  # another seed: added, task reused
    assert (first.root / "students" / "init_seed4" / "model.safetensors").is_file()


def test_demo_configs_pass_the_recipe_checks(demo_ws, tmp_path):
    """The three demo YAMLs, pointed at their folders, are valid recipe configs."""
    for name in ("demo/student_ce", "demo/student_kd"):
        check_config(demo_config(name, [f"assets_dir={demo_ws.root}"]))  # raises on a problem
    teacher_ws = setup_teacher_workspace(tmp_path / "teacher", DEFAULT_SPEC)
    check_config(demo_config(TEACHER_CONFIG, [f"assets_dir={teacher_ws.root}"]))


def test_every_demo_variant_is_a_valid_config_override(demo_ws):
    """Each student run of the demo (CE-only and the four divergences) passes the recipe checks."""
    for variant in variants(quick=False):
        cfg = demo_config(variant.config, run_overrides(demo_ws, 1, variant, []))
        check_config(cfg)  # raises on any problem
        assert cfg.checkpointer.checkpoint_dir == str(demo_ws.student_init_dir(1))


def test_truncated_held_out_answers_are_refused(demo_ws):
    cfg = demo_config(KD_CONFIG, [*_overrides(demo_ws), "tokenizer.max_seq_len=16"])
    with pytest.raises(ValueError, match="does not tokenise to its answer"):
        evaluate_checkpoints(cfg, {}, teacher=None)


def test_eval_command_scores_each_seed(demo_ws, tmp_path, capsys):
    out = tmp_path / "rows.json"
    argv = [
        "--config", KD_CONFIG, *_overrides(demo_ws),
        "--checkpoint", f"before={demo_ws.root}/students/init_seed{{seed}}",
        "--seeds", "0", "1", "--json", str(out),
    ]  # fmt: skip
    assert eval_main(argv) == 0
    printed = capsys.readouterr().out
    assert "true KL" in printed and "mean ± std over seeds [0, 1]" in printed
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2
    assert rows[0]["teacher"] == rows[1]["teacher"]  # the same teacher for every seed
    assert rows[0]["before"] != rows[1]["before"]  # different initial students


def test_eval_command_refuses_seeds_without_placeholder(demo_ws):
    argv = ["--config", KD_CONFIG, *_overrides(demo_ws), "--checkpoint",
            f"before={demo_ws.student_init_dir(0)}", "--seeds", "0", "1"]  # fmt: skip
    with pytest.raises(SystemExit):
        eval_main(argv)


@pytest.mark.slow
def test_short_demo_run_kd_student_beats_ce_only_student(demo_ws, capsys):
    """The demo's own pipeline on few steps: KD is closer to the truth and to the teacher."""
    results = run_demo(
        demo_ws.root,
        seeds=[0],
        quick=True,
        extra=["epochs=3", f"validation_dataset.data_files={demo_ws.root}/data/val_small.json"],
        setup_only=False,
    )
    rows = results["per_seed"][0]
    assert rows["ce_only"]["true_kl"] < rows["before"]["true_kl"]  # training did something
    assert rows["kd_forward_kl"]["true_kl"] < rows["ce_only"]["true_kl"]
    assert rows["kd_forward_kl"]["teacher_kl"] < rows["ce_only"]["teacher_kl"]
    assert rows["kd_forward_kl"]["ce"] < rows["ce_only"]["ce"]
    printed = capsys.readouterr().out
    assert "| student, KD forward KL |" in printed
    assert (demo_ws.root / "results.md").read_text().count("|") > 20


def test_overrides_may_follow_seeds_and_option_values_may_hold_equals():
    args, overrides = _split_overrides(
        eval_parser(),
        [
            "--config",
            "c",
            "--checkpoint",
            "kd=a=b",
            "--seeds",
            "0",
            "1",
            "assets_dir=x",
            "--json",
            "o=p",
        ],
    )
    assert args.checkpoint == [("kd", "a=b")]
    assert args.seeds == [0, 1]
    assert str(args.json) == "o=p"
    assert overrides == ["assets_dir=x"]
