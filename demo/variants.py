"""The demo's table rows: each a student training run (config, overrides, label), and the
comparisons the demo draws between rows (on-policy against off-policy, cached against online).

:mod:`kdtune.demo.pipeline` trains and evaluates them.
"""

from __future__ import annotations

from dataclasses import dataclass

CE_CONFIG = "demo/student_ce"


KD_CONFIG = "demo/student_kd"


@dataclass(frozen=True)
class Variant:
    """One student training run: the config, its overrides and the table's label."""

    name: str
    label: str
    config: str
    overrides: tuple[str, ...]
    start: str | None = None
    """Name of the variant whose final checkpoint this run starts from (None: random init)."""
    compare_to: tuple[str, ...] = ()
    """On-policy rows: the off-policy rows they are measured against (same steps, prompts)."""


_LOSSES = "kdtune.losses"


CE_ONLY = Variant("ce_only", "student, CE-only fine-tuning", CE_CONFIG, ())


KD_FORWARD = Variant(
    "kd_forward_kl",
    "student, KD forward KL",
    KD_CONFIG,
    (f"kd_loss._component_={_LOSSES}.ForwardKLWithChunkedOutputLoss",),
)


KD_VARIANTS: tuple[Variant, ...] = (
    Variant(
        "kd_reverse_kl",
        "student, KD reverse KL",
        KD_CONFIG,
        (f"kd_loss._component_={_LOSSES}.ReverseKLWithChunkedOutputLoss",),
    ),
    Variant(
        "kd_jsd",
        "student, KD JSD (beta 0.5)",
        KD_CONFIG,
        (f"kd_loss._component_={_LOSSES}.JSDWithChunkedOutputLoss", "kd_loss.beta=0.5"),
    ),
    Variant(
        "kd_skew_kl",
        "student, KD skew KL (alpha 0.1)",
        KD_CONFIG,
        (f"kd_loss._component_={_LOSSES}.SkewForwardKLWithChunkedOutputLoss", "kd_loss.alpha=0.1"),
    ),
)


ON_POLICY_MAX_NEW_TOKENS = 16


_FKL = f"kd_loss._component_={_LOSSES}.ForwardKLWithChunkedOutputLoss"


_RKL = f"kd_loss._component_={_LOSSES}.ReverseKLWithChunkedOutputLoss"


_EVERY_STEP = f"on_policy={{fraction: 1.0, max_new_tokens: {ON_POLICY_MAX_NEW_TOKENS}}}"


_HALF_THE_STEPS = f"on_policy={{fraction: 0.5, max_new_tokens: {ON_POLICY_MAX_NEW_TOKENS}}}"


SFT_EPOCHS = 10  # + DISTIL_EPOCHS = the 20 epochs (160 steps) of demo/student_ce and student_kd


DISTIL_EPOCHS = 10


SFT_START = Variant(
    "ce_only_half",
    "student, CE-only fine-tuning, first 80 steps (start of the next rows)",
    CE_CONFIG,
    (f"epochs={SFT_EPOCHS}",),
)


_DISTIL_HALF = f"epochs={DISTIL_EPOCHS}"


SFT_ON_POLICY_VARIANTS: tuple[Variant, ...] = (
    Variant(
        "sft_on_policy_rkl",
        "student, 80 CE steps + 80 on-policy KD reverse KL (lambda 1)",
        KD_CONFIG,
        (_RKL, _EVERY_STEP, _DISTIL_HALF),
        start=SFT_START.name,
        compare_to=(KD_FORWARD.name, "sft_kd_forward_kl"),
    ),
    Variant(
        "sft_mixed_fkl",
        "student, 80 CE steps + 80 mixed KD forward KL (lambda 0.5)",
        KD_CONFIG,
        (_FKL, _HALF_THE_STEPS, _DISTIL_HALF),
        start=SFT_START.name,
        compare_to=(KD_FORWARD.name, "sft_kd_forward_kl"),
    ),
)


ANSWER_FREE_ON_POLICY_VARIANTS: tuple[Variant, ...] = (
    Variant(
        "kd_on_policy_rkl",
        "student, on-policy KD reverse KL (lambda 1) from random init, no answer read",
        KD_CONFIG,
        (_RKL, _EVERY_STEP),
        compare_to=(KD_FORWARD.name,),
    ),
    Variant(
        "kd_mixed_fkl",
        "student, mixed KD forward KL (lambda 0.5) from random init",
        KD_CONFIG,
        (_FKL, _HALF_THE_STEPS),
        compare_to=(KD_FORWARD.name,),
    ),
)
"""The issue's rows as stated: 160 steps from the random student; the on-policy row never reads
an answer."""


CONTROL_VARIANTS: tuple[Variant, ...] = (
    Variant(
        "sft_kd_forward_kl",
        "student, 80 CE steps + 80 off-policy KD forward KL (control)",
        KD_CONFIG,
        (_FKL, _DISTIL_HALF),
        start=SFT_START.name,
    ),
)


ON_POLICY_VARIANTS = (
    *ANSWER_FREE_ON_POLICY_VARIANTS,
    SFT_START,
    *SFT_ON_POLICY_VARIANTS,
    *CONTROL_VARIANTS,
)


CACHED_TOP_K = (2, 4, 8)


CACHE_FOLDER = "teacher_cache"


def cached_variant(k: int) -> Variant:
    """Forward-KL KD from the cached top-k teacher log-probs (the folder is in the workspace)."""
    return Variant(
        f"kd_cached_top{k}",
        f"student, KD forward KL from cached top-{k}",
        KD_CONFIG,
        (f"teacher_cache=${{assets_dir}}/{CACHE_FOLDER}/top{k}",),
    )


CACHED_VARIANTS: tuple[Variant, ...] = tuple(cached_variant(k) for k in CACHED_TOP_K)


VARIANTS_BY_NAME: dict[str, Variant] = {
    v.name: v
    for v in (
        CE_ONLY,
        KD_FORWARD,
        *CACHED_VARIANTS,
        *KD_VARIANTS,
        *ON_POLICY_VARIANTS,
    )
}


LABELS: dict[str, str] = {
    "before": "student, before training",
    **{name: v.label for name, v in VARIANTS_BY_NAME.items()},
    "teacher": "teacher (shipped)",
    "truth": "true distribution (floor)",
}


def variants(
    quick: bool, cached: bool = True, on_policy: bool = True, controls: bool = False
) -> list[Variant]:
    """The runs of one seed, in order (a run's ``start`` comes before it).

    CE-only and forward-KL KD always; unless ``quick``: KD from the cached top-k (if
    ``cached``) and the other divergences; the on-policy and mixed rows (with their 80-step
    CE-only start, and the answer-free rows from the random student) if ``on_policy`` and not
    ``quick``, or if ``controls``, which adds the control run (:data:`CONTROL_VARIANTS`).
    """
    plan = [CE_ONLY, KD_FORWARD]
    if not quick:
        plan += [*(CACHED_VARIANTS if cached else ()), *KD_VARIANTS]
    if (on_policy and not quick) or controls:
        plan += [*ANSWER_FREE_ON_POLICY_VARIANTS, SFT_START, *SFT_ON_POLICY_VARIANTS]
    if controls:
        plan += CONTROL_VARIANTS
    return plan


def on_policy_vs_off_policy(per_seed: list[dict[str, dict]]) -> dict[tuple[str, str], int]:
    """Per (on-policy row, off-policy row it is compared with): in how many seeds the first
    beats the second on both sample-based metrics (higher true log-likelihood per token, lower
    sequence reverse KL). Pairs whose rows did not run are left out."""
    pairs = [(v.name, other) for v in ON_POLICY_VARIANTS for other in v.compare_to]
    return {
        (name, other): sum(
            rows[name]["sample_true_ll"] > rows[other]["sample_true_ll"]
            and rows[name]["sample_reverse_kl"] < rows[other]["sample_reverse_kl"]
            for rows in per_seed
        )
        for name, other in pairs
        if name in per_seed[0] and other in per_seed[0]
    }


def cached_vs_online(per_seed: list[dict[str, dict]]) -> dict[int, list[float]]:
    """Per k, each seed's held-out true KL of the cached-top-k student / the online KD one."""
    return {
        k: [rows[v.name]["true_kl"] / rows[KD_FORWARD.name]["true_kl"] for rows in per_seed]
        for k, v in zip(CACHED_TOP_K, CACHED_VARIANTS)
        if v.name in per_seed[0]
    }
