"""The demo's on-policy rows: they continue from the CE-only student and are judged against the
off-policy row with the same start, steps and prompts."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from kdtune.demo.evaluate import resolve_checkpoint_dir, weight_files
from kdtune.demo.pipeline import run_overrides, train_variant
from kdtune.demo.runner import demo_config
from kdtune.demo.table import markdown_table
from kdtune.demo.variants import (
    ANSWER_FREE_ON_POLICY_VARIANTS,
    CONTROL_VARIANTS,
    DISTIL_EPOCHS,
    KD_CONFIG,
    KD_FORWARD,
    ON_POLICY_VARIANTS,
    SFT_EPOCHS,
    SFT_ON_POLICY_VARIANTS,
    SFT_START,
    on_policy_vs_off_policy,
    variants,
)
from kdtune.demo.workspace import prepare_workspace
from kdtune.training.config.rules import check_config
from kdtune.training.on_policy import on_policy_settings

pytestmark = pytest.mark.usefixtures("one_thread_and_restored_torch_globals")

SHORT = ["epochs=1", "max_steps_per_epoch=2", "validation_dataset=null"]


@pytest.fixture(scope="module")
def demo_ws(tmp_path_factory):
    ws, _ = prepare_workspace(tmp_path_factory.mktemp("demo_on_policy"), seeds=[0])
    return ws


def _weights(folder) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in weight_files(resolve_checkpoint_dir(folder)):
        out.update(load_file(str(path)))
    return out


def test_every_run_starts_after_its_start_and_is_compared_within_the_plan():
    for flags in [(False, True, True, False), (False, False, True, True), (True, True, True, True)]:
        plan = variants(*flags)
        names = [v.name for v in plan]
        for i, variant in enumerate(plan):
            if variant.start is not None:
                assert variant.start in names[:i], (variant.name, names)
            assert KD_FORWARD.name in names  # every on-policy row's first comparison
            if flags[3]:  # with the controls, every comparison runs
                assert set(variant.compare_to) <= set(names), variant.name
    default = [v.name for v in variants(quick=False)]
    on_policy = [
        *(v.name for v in ANSWER_FREE_ON_POLICY_VARIANTS),
        SFT_START.name,
        *(v.name for v in SFT_ON_POLICY_VARIANTS),
    ]
    assert default[-5:] == on_policy
    assert not {v.name for v in CONTROL_VARIANTS} & set(default)
    assert [v.name for v in variants(quick=True)] == ["ce_only", "kd_forward_kl"]
    assert [v.name for v in variants(quick=True, controls=True)][2:7] == on_policy


def test_on_policy_rows_are_the_issue_s_settings(demo_ws):
    """lambda 1 with reverse KL, lambda 0.5 mixed, each 160 steps in all like the off-policy
    rows (80 CE-only steps first for the rows that start from SFT_START)."""
    steps_per_epoch = 128 // 16
    fractions, steps = {}, {}
    for variant in (KD_FORWARD, *ON_POLICY_VARIANTS):
        cfg = demo_config(variant.config, run_overrides(demo_ws, 0, variant, []))
        check_config(cfg)  # raises on any problem
        settings = on_policy_settings(cfg.get("on_policy"))
        fractions[variant.name] = None if settings is None else settings.fraction
        if settings is not None and settings.fraction == 1.0:
            assert cfg.kd_loss._component_.endswith("ReverseKLWithChunkedOutputLoss")
        steps[variant.name] = cfg.epochs * steps_per_epoch
    for variant in (v for v in ON_POLICY_VARIANTS if v is not SFT_START):
        before = steps[variant.start] if variant.start else 0
        assert before + steps[variant.name] == steps[KD_FORWARD.name] == 160, variant.name
    assert demo_config(KD_CONFIG, []).epochs == SFT_EPOCHS + DISTIL_EPOCHS
    assert fractions == {
        "kd_forward_kl": None,
        "ce_only_half": None,
        "sft_on_policy_rkl": 1.0,
        "sft_mixed_fkl": 0.5,
        "sft_kd_forward_kl": None,
        "kd_on_policy_rkl": 1.0,
        "kd_mixed_fkl": 0.5,
    }


@pytest.mark.slow
def test_a_continued_run_starts_from_the_ce_only_checkpoint(demo_ws):
    """With lr 0 the on-policy run's final weights are exactly its start's: the CE-only run's
    checkpoint, not the random initial student; and every one of its steps sampled."""
    ce = train_variant(demo_ws, 0, SFT_START, SHORT)
    on_policy = SFT_ON_POLICY_VARIANTS[0]
    frozen = [*SHORT, "optimizer.lr=0.0"]
    continued = train_variant(demo_ws, 0, on_policy, frozen, start=ce.checkpoint)
    start, end = _weights(ce.checkpoint), _weights(continued.checkpoint)
    assert start.keys() == end.keys()
    assert all(torch.equal(start[k], end[k]) for k in start)
    initial = _weights(demo_ws.student_init_dir(0))
    assert any(not torch.equal(start[k], initial[k]) for k in start)  # CE-only did train
    records = [json.loads(line) for line in (continued.output_dir / "metrics.jsonl").open()]
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == 2 and all(r["generated_tokens"] > 0 for r in train)


def test_verdict_needs_both_sample_metrics_against_each_off_policy_row():
    def rows(ll: float, rkl: float, scratch_ll: float) -> dict[str, dict]:
        return {
            "kd_forward_kl": {"sample_true_ll": -8.0, "sample_reverse_kl": 40.0},
            "sft_kd_forward_kl": {"sample_true_ll": -5.0, "sample_reverse_kl": 20.0},
            "sft_on_policy_rkl": {"sample_true_ll": ll, "sample_reverse_kl": rkl},
            "kd_on_policy_rkl": {"sample_true_ll": scratch_ll, "sample_reverse_kl": 30.0},
        }

    per_seed = [
        rows(-4.0, 12.0, -9.0),  # beats both off-policy rows on both metrics
        rows(-4.0, 25.0, -7.0),  # reverse KL 25: beats 40 but not 20
        rows(-6.0, 15.0, -7.0),  # true LL -6: beats -8 but not -5
    ]
    assert on_policy_vs_off_policy(per_seed) == {
        ("sft_on_policy_rkl", "kd_forward_kl"): 3,
        ("sft_on_policy_rkl", "sft_kd_forward_kl"): 1,
        ("kd_on_policy_rkl", "kd_forward_kl"): 2,  # -7 > -8 twice; sft_mixed_fkl did not run
    }


def test_table_reports_the_share_of_valid_answers():
    metrics = {"sample_valid": 0.8125, "ce": 1.0}
    table = markdown_table({"a": metrics})
    assert "own samples: valid" in table.splitlines()[0]
    assert "| 0.812 |" in table
