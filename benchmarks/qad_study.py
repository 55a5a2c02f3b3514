"""QAD study (issue 24): a Q4_0 student by post-training quantisation, QAT with CE, and QAD.

The student is SmolLM2-135M-Instruct itself (``--student``: any Llama HF folder, e.g. a pruned
one whose widths are multiples of 32) deployed as llama.cpp ``Q4_0`` (blocks of 32 weights, the
embedding and tied head ``Q8_0``, as ``llama-quantize`` and ``kdtune export --quant q4_0`` keep
them; ``--embedding-quant q4_0``: Q4_0 too, trained and exported so). Arms, per data order (``--orders``), same records, order, steps and optimizer:

- ``ptq``: no training; the student's weights exported to Q4_0;
- ``qat_ce``: training with the GGUF Q4_0 fake quantiser
  (``quantizer: kdtune.quantization.qat.GGUFQ4_0QATQuantizer``) and cross-entropy only;
- ``qad``: the same fake quantiser, forward KL from the bf16 teacher's cached top-64 mixed with
  CE (``kd_ratio`` of the shipped KD config).

Every arm is scored *as deployed*: its final weights written by ``kdtune export --format gguf
--quant q4_0`` and read back by transformers' GGUF loader (:func:`kdtune.smollm2.convert.
convert_gguf`, an independent reader), then perplexity, KL to the teacher and top-1 agreement
(:func:`kdtune.smollm2.evaluate.evaluate_models`) on three held-out sets: the training corpus's
held-out documents (no prefix), out-of-corpus text (``ood_*``: Debian's licence texts) and the
teacher's own answers to general chat questions (``answers_*``: :data:`ANSWER_PROMPTS`, sampled
at temperature 1, answer tokens only). CE on the corpus lowers the first two below even the
teacher's perplexity (the instruct teacher is not a raw-text model); the third is the teacher's
distribution, the one QAD trains toward. ``--rescore`` adds missing sets to a finished study. The fraction of the PTQ KL
gap an arm closes is ``(KL_ptq - KL_arm) / (KL_ptq - KL_start)`` (``KL_start``: the bf16
student before any quantisation; 0 for the teacher as student).

Data and teacher cache come from a recovery-study folder (``--study``, made by
``benchmarks/recovery_study.py``): its ``data/{train,val}.json`` and ``teacher_cache/``.

::

    python benchmarks/qad_study.py --root ./kdtune_real --study ./study --out ./qad --steps 100

Output under ``--out``: ``metrics.jsonl`` (one line per arm x order, plus teacher and start),
``results.md`` (the table), ``study.json`` (command, machine, load, versions, budget, sizes).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import statistics
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig
from safetensors.torch import load_file
from torchtune.data import Message

from kdtune.smollm2.convert import convert_gguf
from kdtune.smollm2.demo import kdtune_command, run_logged, student_folder_overrides
from kdtune.smollm2.evaluate import evaluate_models, load_smollm2
from kdtune.smollm2.text import to_records
from kdtune.smollm2.tokenizer import SmolLM2Tokenizer
from kdtune.training.checkpoint.layout import CHECKPOINTS_DIRNAME, step_dirname
from kdtune.training.config.loading import load_config, resolve_config
from kdtune.training.generation import SamplingOptions, generate, row_seed

CONFIGS = {"qat_ce": "smollm2/135M_prune15_ce", "qad": "smollm2/135M_prune15_kd"}


def quantizer(embedding_quant: str) -> str:
    """The ``quantizer=`` override: GGUF Q4_0 fake quantisation, the embedding as given."""
    return (
        "{_component_: kdtune.quantization.qat.GGUFQ4_0QATQuantizer, "
        f"embedding: {embedding_quant}}}"
    )


SCORES = ("perplexity", "ce", "kl_to_teacher", "top1_agreement")
ANSWER_PROMPTS = (
    "How does photosynthesis work?",
    "Write a short poem about the sea.",
    "What are the benefits of regular exercise?",
    "How do I make a good cup of tea?",
    "Explain what a black hole is to a child.",
    "Give me three tips for a job interview.",
    "What is the difference between weather and climate?",
    "Summarise the plot of Romeo and Juliet.",
    "Why is the sky blue?",
    "Suggest a healthy breakfast.",
    "What causes earthquakes?",
    "How can I save money each month?",
    "Describe the water cycle.",
    "What should I pack for a weekend hiking trip?",
    "Explain how vaccines work.",
    "Write a friendly email declining an invitation.",
)
"""Chat questions (general topics, none about Python) the teacher answers for the
``answers_*`` scores: the instruct teacher's own distribution, which QAD trains toward and which
fitting the training corpus does not win by itself."""
LICENSES = Path("/usr/share/common-licenses")
OOD_FILES = ("Apache-2.0", "Artistic", "GFDL-1.3", "GPL-3", "MPL-2.0")
"""Debian's licence texts: English prose outside the training corpus, for a perplexity that
a fit to the corpus does not win by itself."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("::")[0].strip())
    parser.add_argument("--root", type=Path, default=Path("./kdtune_real"), help="set-up folder")
    parser.add_argument("--study", type=Path, required=True, help="a recovery-study --out folder")
    parser.add_argument("--out", type=Path, required=True, help="this study's folder")
    parser.add_argument("--student", type=Path, default=None, help="default: ROOT/teacher")
    parser.add_argument("--orders", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per arm")
    parser.add_argument("--eval-records", type=int, default=64, help="held-out records scored")
    parser.add_argument("--arms", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--lr", type=float, default=None, help="every arm (default: config's)")
    parser.add_argument(
        "--kd-ratio", type=float, default=None, help="qad arm (default: the KD config's 0.5)"
    )
    parser.add_argument(
        "--ood-text",
        type=Path,
        nargs="*",
        default=[LICENSES / name for name in OOD_FILES],
        help=f"text files for an out-of-corpus perplexity (default: {', '.join(OOD_FILES)} "
        f"in {LICENSES})",
    )
    parser.add_argument(
        "--answers-per-prompt",
        type=int,
        default=4,
        help="teacher answers sampled per ANSWER_PROMPTS question for the answers_* scores "
        "(0: none)",
    )
    parser.add_argument(
        "--embedding-quant",
        choices=("q8_0", "q4_0"),
        default="q8_0",
        help="the token embedding / tied head, trained (fake quantiser) and exported as this "
        "(q4_0: llama-quantize --pure, the smallest file)",
    )
    parser.add_argument(
        "--rescore",
        action="store_true",
        help="no training: add the scores of held-out sets missing from --out's metrics.jsonl "
        "to its rows (the arms' deployed folders), rewrite metrics.jsonl and results.md",
    )
    return parser.parse_args(argv)


def deployed(source: Path, work: Path, embedding_quant: str = "q8_0") -> tuple[Path, int]:
    """``source`` (a checkpoint or HF folder) as llama.cpp runs it: exported to Q4_0 GGUF (the
    embedding as ``embedding_quant``) and read back into an HF folder by transformers. Returns
    the folder and the GGUF's bytes."""
    gguf_file = work / "model-q4_0.gguf"
    if not gguf_file.is_file():
        run_logged(
            kdtune_command(
                "export",
                str(source),
                "--format",
                "gguf",
                "--quant",
                "q4_0",
                "--embedding-quant",
                embedding_quant,
                "--out",
                str(gguf_file),
            ),
            work / "export.log",
            "Q4_0 export",
        )
    return convert_gguf(gguf_file, work / "hf"), gguf_file.stat().st_size


def train(args, arm: str, order: int, common: list[str], cache: Path) -> tuple[Path, float]:
    """One fake-quantised ``kdtune run`` of ``arm``; its run folder and seconds."""
    out = args.out / "runs" / f"{arm}_order{order}"
    shutil.rmtree(out, ignore_errors=True)
    overrides = [
        *common,
        f"output_dir={out}",
        f"seed={order}",
        "epochs=1",
        f"max_steps_per_epoch={args.steps}",
        f"save_every_n_steps={args.steps}",
        f"quantizer={quantizer(args.embedding_quant)}",
        "fake_quant_after_n_steps=0",
    ]
    if args.lr is not None:
        overrides.append(f"optimizer.lr={args.lr}")
    if arm == "qad" and args.kd_ratio is not None:
        overrides.append(f"kd_ratio={args.kd_ratio}")
    if arm == "qad":
        overrides += [
            "teacher_model._component_=kdtune.models.llama_from_hf_folder",
            "~teacher_model.num_layers",
            f"teacher_model.folder={args.root / 'teacher'}",
            f"teacher_cache={cache}",
        ]
    command = kdtune_command("run", "knowledge_distillation", "--config", CONFIGS[arm], *overrides)
    return out, run_logged(command, args.out / "logs" / f"{out.name}.log", f"{out.name} run")


def gap_closed(kl_ptq: float, kl_arm: float, kl_start: float) -> float:
    """The fraction of post-training quantisation's KL gap that ``kl_arm`` closes."""
    return (kl_ptq - kl_arm) / max(kl_ptq - kl_start, 1e-12)


def _cell(group: list[dict], key: str, fmt: str) -> str:
    """Mean ± std of ``key`` over ``group`` (one value: the value; none: empty)."""
    values = [r[key] for r in group if r.get(key) is not None]
    if len(values) <= 1:
        return fmt.format(values[0]) if values else ""
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def table(rows: list[dict]) -> str:
    """Markdown: one line per arm, mean ± std over the orders, then each order's values."""
    lines = [
        "| arm | corpus perplexity ↓ | corpus KL to teacher ↓ | top-1 ↑ | PTQ KL gap closed ↑ "
        "| licences perplexity ↓ | licences KL ↓ | teacher's answers perplexity ↓ "
        "| teacher's answers KL ↓ | per order (corpus ppl / KL / answers ppl) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for arm in ("teacher", "start", "ptq", *CONFIGS):
        group = [r for r in rows if r["arm"] == arm]
        if not group:
            continue
        per_order = ", ".join(
            f"{r['order']}: {r['perplexity']:.2f} / {r['kl_to_teacher']:.4f}"
            + (f" / {r['answers_perplexity']:.2f}" if "answers_perplexity" in r else "")
            for r in group
            if r.get("order") is not None
        )
        cells = [
            _cell(group, "perplexity", "{:.2f}"),
            _cell(group, "kl_to_teacher", "{:.4f}"),
            _cell(group, "top1_agreement", "{:.3f}"),
            _cell(group, "gap_closed", "{:.2f}"),
            _cell(group, "ood_perplexity", "{:.2f}"),
            _cell(group, "ood_kl_to_teacher", "{:.4f}"),
            _cell(group, "answers_perplexity", "{:.2f}"),
            _cell(group, "answers_kl_to_teacher", "{:.4f}"),
        ]
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {per_order} |")
    return "\n".join(lines)


def write_ood_records(files: list[Path], teacher: Path, record_tokens: int, out: Path) -> Path:
    """``files``' text cut into records of ``record_tokens`` tokens, as ``out`` (JSON list),
    taken from the files in turn (the first N records sample every file)."""
    tokenizer = SmolLM2Tokenizer(teacher)
    per_file = [
        to_records([p.read_text(errors="replace")], tokenizer, record_tokens) for p in files
    ]
    records = [r for group in itertools.zip_longest(*per_file) for r in group if r is not None]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, ensure_ascii=False))
    return out


def wins_over_qat_ce(rows: list[dict], orders: list[int], metric: str) -> int | None:
    """In how many orders the qad arm's ``metric`` is below qat_ce's (None: an arm is absent)."""
    by_arm = {(r["arm"], r["order"]): r for r in rows}
    pairs = [(by_arm.get(("qad", o)), by_arm.get(("qat_ce", o))) for o in orders]
    if any(a is None or b is None or metric not in a for a, b in pairs):
        return None
    return sum(a[metric] < b[metric] for a, b in pairs)


def write_teacher_answers(teacher: Path, out: Path, per_prompt: int, max_new_tokens: int) -> Path:
    """The teacher's own answers to :data:`ANSWER_PROMPTS` (``per_prompt`` samples each at
    temperature 1 from the fp32 teacher that scores the arms, kdtune's sampler), as ``out``:
    a JSON list of ``{"prompt", "answer"}``. Kept if ``out`` exists."""
    if out.is_file():
        return out
    tokenizer = SmolLM2Tokenizer(teacher)
    model = load_smollm2(teacher)
    questions = [q for q in ANSWER_PROMPTS for _ in range(per_prompt)]
    options = SamplingOptions(max_new_tokens=max_new_tokens, temperature=1.0)
    stops = set(tokenizer.stop_tokens)
    records = []
    for start in range(0, len(questions), 8):
        batch = questions[start : start + 8]
        prompts = [
            tokenizer.tokenize_messages(
                [Message("user", q), Message("assistant", "")], add_end_tokens=False
            )[0]
            for q in batch
        ]
        done = generate(
            model,
            prompts,
            options,
            seeds=[row_seed(0, 0, start + i) for i in range(len(batch))],
            stop_ids=tokenizer.stop_tokens,
            pad_id=tokenizer.pad_id,
            cache_dtype=torch.float32,
        )
        for question, tokens in zip(batch, done.tokens, strict=True):
            answer = tokenizer.decode([t for t in tokens if t not in stops]).strip()
            records.append({"prompt": question, "answer": answer})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, ensure_ascii=False, indent=0))
    return out


def eval_configs(args, common: list[str], teacher: Path) -> dict[str, DictConfig]:
    """Score prefix -> the config whose ``validation_dataset`` is that held-out set: ``""`` the
    corpus's held-out documents, ``ood_`` the out-of-corpus text, ``answers_`` the teacher's
    own answers (answer tokens only: ``instruct_dataset`` masks the prompts)."""
    base = resolve_config(CONFIGS["qad"])
    cfg = load_config(base, common)
    sets = {"": cfg}
    if args.ood_text:
        ood = write_ood_records(
            args.ood_text, teacher, cfg.tokenizer.max_seq_len - 1, args.out / "data" / "ood.json"
        )
        sets["ood_"] = load_config(base, [*common, f"validation_dataset.data_files={ood}"])
    if args.answers_per_prompt:
        answers = write_teacher_answers(
            teacher, args.out / "data" / "teacher_answers.json", args.answers_per_prompt, 80
        )
        sets["answers_"] = load_config(
            base,
            [
                *common,
                "validation_dataset._component_=torchtune.datasets.instruct_dataset",
                "~validation_dataset.column",
                "validation_dataset.column_map={input: prompt, output: answer}",
                "validation_dataset.train_on_input=false",
                f"validation_dataset.data_files={answers}",
            ],
        )
    return sets


def score(
    args, sets: dict[str, DictConfig], teacher: Path, models: dict[str, Path], with_teacher=False
) -> dict[str, dict]:
    """Model name -> its scores on every set (keys prefixed as in :func:`eval_configs`)."""
    scores: dict[str, dict] = {}
    for prefix, set_cfg in sets.items():
        found = evaluate_models(
            set_cfg,
            models,
            teacher,
            max_records=args.eval_records,
            prompts=(),
            include_teacher=with_teacher,
        )
        for r in found:
            scores.setdefault(r["model"], {}).update({prefix + k: r[k] for k in SCORES})
    return scores


def summary(
    rows: list[dict], orders: list[int], gguf_bytes: int, params: int, embedding_quant: str
) -> str:
    """Which metrics QAD wins in how many orders, and the file size."""
    wins = [
        f"{label} in {count}/{len(orders)} orders"
        for label, metric in (
            ("perplexity", "perplexity"),
            ("KL to the teacher", "kl_to_teacher"),
            ("out-of-corpus perplexity", "ood_perplexity"),
            ("out-of-corpus KL", "ood_kl_to_teacher"),
            ("perplexity of the teacher's answers", "answers_perplexity"),
            ("KL on the teacher's answers", "answers_kl_to_teacher"),
        )
        if (count := wins_over_qat_ce(rows, orders, metric)) is not None
    ]
    return (f"QAD beats QAT-CE on {', '.join(wins)}. " if wins else "") + (
        f"Q4_0 GGUF (embedding {embedding_quant.upper()}) {gguf_bytes / 1e6:.1f} MB = "
        f"{gguf_bytes / (2 * params):.3f}x the bf16 "
        f"weights ({2 * params / 1e6:.1f} MB, {params:,} parameters)."
    )


def write_results(args, rows: list[dict], gguf_bytes: int, params: int) -> None:
    """``metrics.jsonl`` (all rows) and ``results.md`` (table and summary)."""
    (args.out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = (
        f"{table(rows)}\n\n{summary(rows, args.orders, gguf_bytes, params, args.embedding_quant)}"
    )
    (args.out / "results.md").write_text(text + "\n")
    print(f"\n{text}")


def folders_of(args, student: Path) -> dict[tuple[str, int | None], Path]:
    """(arm, order) -> the HF folder scored for it (the deployed arms' read-back GGUFs)."""
    folders: dict[tuple[str, int | None], Path] = {
        ("start", None): student,
        ("ptq", None): args.out / "ptq" / "hf",
    }
    for order in args.orders:
        for arm in args.arms:
            folders[(arm, order)] = args.out / "deployed" / f"{arm}_order{order}" / "hf"
    return folders


def rescore(args, sets: dict[str, DictConfig], teacher: Path, student: Path, params: int) -> int:
    """Add the scores of sets missing from ``metrics.jsonl``'s rows (no training, no export)."""
    rows = [json.loads(line) for line in (args.out / "metrics.jsonl").read_text().splitlines()]
    folders = folders_of(args, student)
    missing = {p: c for p, c in sets.items() if any(p + "perplexity" not in r for r in rows)}
    for prefix, set_cfg in missing.items():
        names = {f"{arm}@{order}": folders[(arm, order)] for arm, order in folders}
        found = score(args, {prefix: set_cfg}, teacher, names, with_teacher=True)
        for row in rows:
            name = "teacher" if row["arm"] == "teacher" else f"{row['arm']}@{row['order']}"
            row.update(found[name])
    gguf_bytes = (args.out / "ptq" / "model-q4_0.gguf").stat().st_size
    study = json.loads((args.out / "study.json").read_text())
    args.embedding_quant = study.get("embedding_quant", "q8_0")  # as trained, not the flag
    write_results(args, rows, gguf_bytes, params)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    student = (args.student or args.root / "teacher").resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    train_file, val_file = args.study / "data" / "train.json", args.study / "data" / "val.json"
    cache = args.study / "teacher_cache"
    for path in (train_file, val_file, cache / "manifest.json", student / "config.json"):
        if not path.is_file():
            raise SystemExit(f"no {path}: run benchmarks/recovery_study.py first (see --study)")
    for path in args.ood_text:
        if not path.is_file():
            raise SystemExit(f"--ood-text: no file {path}")
    common = [
        f"assets_dir={args.root}",
        f"dataset.data_files={train_file}",
        f"validation_dataset.data_files={val_file}",
        *student_folder_overrides(student),
    ]
    teacher = args.root / "teacher"
    params = sum(t.numel() for t in load_file(str(next(student.glob("*.safetensors")))).values())
    sets = eval_configs(args, common, teacher)
    if args.rescore:
        return rescore(args, sets, teacher, student, params)
    cfg = sets[""]
    tokens_per_step = cfg.batch_size * cfg.gradient_accumulation_steps * cfg.tokenizer.max_seq_len
    study = {
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "load_start": os.getloadavg(),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "student": str(student),
        "budget": {"steps": args.steps, "tokens": args.steps * tokens_per_step},
        "optimizer": {
            "lr": args.lr or cfg.optimizer.lr,
            "qad_kd_ratio": args.kd_ratio or cfg.kd_ratio,
        },
        "data": {
            "train": str(train_file),
            "val": str(val_file),
            "cache": str(cache),
            "out_of_corpus": [str(p) for p in args.ood_text],
            "teacher_answers": f"{args.answers_per_prompt} per prompt x {len(ANSWER_PROMPTS)}",
        },
        "eval_records": args.eval_records,
        "embedding_quant": args.embedding_quant,
    }
    rows: list[dict] = []

    def record(row: dict) -> None:
        rows.append(row)
        with (args.out / "metrics.jsonl").open("a") as file:
            file.write(json.dumps(row) + "\n")

    (args.out / "metrics.jsonl").write_text("")
    ptq_folder, gguf_bytes = deployed(student, args.out / "ptq", args.embedding_quant)
    fixed = score(args, sets, teacher, {"start": student, "ptq": ptq_folder}, with_teacher=True)
    kl_start, kl_ptq = fixed["start"]["kl_to_teacher"], fixed["ptq"]["kl_to_teacher"]
    record({"arm": "teacher", "order": None, **fixed["teacher"]})
    record({"arm": "start", "order": None, **fixed["start"]})
    record({"arm": "ptq", "order": None, **fixed["ptq"], "gap_closed": 0.0})
    sizes = {
        "student_safetensors_bytes": sum(p.stat().st_size for p in student.glob("*.safetensors")),
        "student_params": params,
        "ptq_gguf_bytes": gguf_bytes,
        "ptq_gguf_vs_bf16": gguf_bytes / (2 * params),
    }
    for order in args.orders:
        for arm in args.arms:
            run_dir, seconds = train(args, arm, order, common, cache)
            final = run_dir / CHECKPOINTS_DIRNAME / step_dirname(args.steps)
            folder, arm_bytes = deployed(
                final, args.out / "deployed" / f"{arm}_order{order}", args.embedding_quant
            )
            scores = score(args, sets, teacher, {arm: folder})[arm]
            record(
                {
                    "arm": arm,
                    "order": order,
                    **scores,
                    "gap_closed": gap_closed(kl_ptq, scores["kl_to_teacher"], kl_start),
                    "train_seconds": seconds,
                    "gguf_bytes": arm_bytes,
                    "load": os.getloadavg(),
                }
            )
            print(
                f"[qad] {arm} order {order}: perplexity {scores['perplexity']:.2f}, KL "
                f"{scores['kl_to_teacher']:.4f} in {seconds:.0f} s",
                flush=True,
            )
    study.update(sizes=sizes, load_end=os.getloadavg())
    (args.out / "study.json").write_text(json.dumps(study, indent=2))
    write_results(args, rows, gguf_bytes, params)
    return 0


if __name__ == "__main__":
    sys.exit(main())
