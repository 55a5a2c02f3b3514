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
from kdtune.demo.pipeline import chains, run_demo, run_overrides, train_and_evaluate
from kdtune.demo.runner import demo_config
from kdtune.demo.tokenizer import tokenizer_sha256
from kdtune.demo.train_teacher import TEACHER_CONFIG, setup_teacher_workspace
from kdtune.demo.variants import KD_CONFIG, variants
from kdtune.demo.workspace import (
    DEFAULT_SPEC,
    SHIPPED_TEACHER_DIR,
    prepare_workspace,
    read_teacher_manifest,
)
from kdtune.training.config.rules import check_config

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


def test_sample_based_metrics_rank_truth_teacher_and_untrained_student(demo_ws):
    cfg = demo_config(KD_CONFIG, _overrides(demo_ws))
    rows = evaluate_checkpoints(
        cfg, {"before": demo_ws.student_init_dir(0)}, teacher=demo_ws.teacher_dir
    )
    truth, teacher, before = rows["truth"], rows["teacher"], rows["before"]
    # The truth's own answers are all valid; its reverse KL to itself is only the smoothing.
    assert truth["sample_valid"] == 1.0
    assert 0.0 < truth["sample_reverse_kl"] < 0.01
    assert teacher["sample_valid"] > 0.8 > 0.05 > before["sample_valid"]
    assert truth["sample_true_ll"] > teacher["sample_true_ll"] > before["sample_true_ll"] + 5
    assert teacher["sample_reverse_kl"] < before["sample_reverse_kl"] / 5


def test_true_token_logprobs_of_a_hand_built_chain():
    import math

    from kdtune.demo.metrics import SMOOTHING, true_token_logprobs
    from kdtune.demo.task import ChainTask
    from kdtune.demo.tokenizer import WordTokens

    # word 0 -> word 1 (0.6) or word 0 (0.2) or end (0.2); word 1 -> word 0 (0.5) or end (0.5)
    task = ChainTask(seed=0, words=("a", "b"), transitions=((0.2, 0.6, 0.2), (0.5, 0.0, 0.5)))
    words = WordTokens(first=(10, 11), later=(20, 21), end=99)
    v = 100

    def smooth(p):
        return math.log((1 - SMOOTHING) * p + SMOOTHING / v)

    # start a: first word b (0.6 / 0.8), then a (0.5), then end (0.2)
    logprobs, valid = true_token_logprobs(task, words, 0, [11, 20, 99], v)
    assert valid
    assert logprobs == pytest.approx([smooth(0.75), smooth(0.5), smooth(0.2)])
    # b cannot follow b; everything after the mistake is impossible too
    logprobs, valid = true_token_logprobs(task, words, 0, [11, 21, 20, 99, 5], v)
    assert not valid
    assert logprobs == pytest.approx([smooth(0.75), smooth(0), smooth(0), smooth(0)])
    # an answer cut before its end token is not valid
    assert not true_token_logprobs(task, words, 0, [11, 20], v)[1]


def test_chains_keep_each_run_after_the_run_it_starts_from():
    plan = variants(quick=False, controls=True)
    found = chains(plan)
    assert sorted(index for chain in found for index, _ in chain) == list(range(1, len(plan) + 1))
    for chain in found:
        names = [variant.name for _, variant in chain]
        for position, (_, variant) in enumerate(chain):
            if variant.start is not None:  # its start runs earlier in the same chain
                assert variant.start in names[:position]
            else:
                assert position == 0
    assert max(len(chain) for chain in found) > 1  # the on-policy rows share their CE start


@pytest.mark.slow
def test_worker_processes_give_the_same_rows_as_one_process(demo_ws):
    """``kdtune demo --jobs 2`` trains in spawned workers: every number of the table is the
    same as in one process (each run is seeded by its own config)."""
    plan = variants(quick=True)
    extra = ["epochs=1", f"validation_dataset.data_files={demo_ws.root}/data/val_small.json"]
    inline, _ = train_and_evaluate(demo_ws, [1], plan, extra, jobs=1, threads=1)
    workers, timings = train_and_evaluate(demo_ws, [1], plan, extra, jobs=2, threads=1)
    # json: the truth row's teacher_kl is NaN in both (NaN != NaN)
    assert json.dumps(workers, sort_keys=True) == json.dumps(inline, sort_keys=True)
    assert set(timings) == {f"seed1/{variant.name}" for variant in plan}
