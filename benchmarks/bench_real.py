"""Real-model recipe benchmark: the SmolLM2 pair of ``kdtune demo --real`` on CPU.

The teacher is SmolLM2-135M-Instruct (30 layers), the student its 15-layer pruned copy
(``./kdtune_real``: ``bash scripts/setup.sh --real && kdtune smollm2 setup --out ./kdtune_real``),
bf16, the real text data (first ``--records`` records of ``data/train.json``), batch 4 x 128
tokens. Every run is a fresh process through the user's command (``tune run
knowledge_distillation_single_device`` for torchtune 0.6.1's recipe, ``kdtune run
knowledge_distillation`` for kdtune's), timed by :mod:`bench_recipe`'s worker (median
step-to-step interval after ``--warmup`` steps; peak RSS = ``VmHWM`` after the last step).

Variants (``--variants``):

- ``torchtune_lora``: torchtune's own KD recipe, LoRA student (its KD recipes are LoRA-only),
  torchtune's chunked CE + forward-KL losses (8 chunks). The baseline of every ratio.
- ``kdtune_{lora,full}_{chunked,fused}``: kdtune's recipe, chunked (8 chunks) or fused loss.
- ``kdtune_full_cached``: the chunked full-parameter run from a top-128 teacher cache, built
  first by ``kdtune cache-teacher`` (timed: tokens/s of the build are reported).
- ``kdtune_full_on_policy``: ``on_policy.fraction=1.0, max_new_tokens=32``, on instruct records
  made from the same text (the first 200 characters as the prompt, the next 400 as the answer).
- ``kdtune_{lora,full}_ce``: CE only (no teacher): the floor.

Runs are interleaved (round-robin, ``--repeats`` rounds) and the 1-minute load average
(``/proc/loadavg``) is recorded before and after every run: on a shared machine the absolute
times are only comparable within one table. ``--before DIR`` also runs each kdtune variant
from another source tree (``DIR/kdtune``, e.g. ``git archive main``): a before/after table from
one interleaved run. ``--profile`` writes each variant's top ops (self CPU time) of one
optimizer step after warmup. ``--quick``: 4 steps (median of the last 3 intervals), 1 round,
24 records. ``--contention`` runs every variant twice per round, alone and beside
:data:`COMPETITOR` (another 2-thread PyTorch training process), and adds each variant's slowdown
and its ratio to the CE-only variant's slowdown. ``--omp-wait-policy`` sets the measured
runs' ``OMP_WAIT_POLICY`` (the competitor keeps libgomp's defaults).

    python benchmarks/bench_real.py --quick
    python benchmarks/bench_real.py --variants torchtune_lora kdtune_lora_chunked --profile
    python benchmarks/bench_real.py --contention --variants kdtune_full_chunked kdtune_full_ce
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_recipe  # noqa: E402  (benchmarks/ is not a package)

REPO = HERE.parent
RESULTS = HERE / "results"
NUM_CHUNKS = 8
SMOLLM2_135M = {
    "vocab_size": 49_152,
    "num_heads": 9,
    "num_kv_heads": 3,
    "embed_dim": 576,
    "intermediate_dim": 1536,
    "norm_eps": 1e-5,
    "rope_base": 100_000,
    "max_seq_len": 8192,
    "scale_factor": 1,
    "tie_word_embeddings": True,
}
# The same LoRA student for both recipes: torchtune's llama3_2 LoRA builder at SmolLM2's shape
# (kdtune.smollm2.models has no LoRA builder); the tied output stays frozen.
LORA_STUDENT = {
    "_component_": "torchtune.models.llama3_2._component_builders.lora_llama3_2",
    **SMOLLM2_135M,
    "num_layers": 15,
    "lora_attn_modules": ["q_proj", "k_proj", "v_proj", "output_proj"],
    "apply_lora_to_mlp": True,
    "apply_lora_to_output": False,
    "lora_rank": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
}
FULL_STUDENT = {"_component_": "kdtune.smollm2.models.smollm2_135m", "num_layers": 15}
TEACHER = {"_component_": "kdtune.smollm2.models.smollm2_135m", "num_layers": 30}


@dataclass(frozen=True)
class Variant:
    name: str
    recipe: str  # torchtune | kdtune
    student: str  # lora | full
    loss: str  # chunked | fused | ce
    label: str
    cached: bool = False
    on_policy: bool = False
    tree: str | None = None  # another kdtune source tree (the --before runs)
    quantizer: dict | None = None  # the student's ``quantizer:`` node (bench_fake_quant.py)


VARIANTS = {
    v.name: v
    for v in (
        Variant("torchtune_lora", "torchtune", "lora", "chunked", "torchtune 0.6.1, LoRA, chunked"),
        Variant("kdtune_lora_chunked", "kdtune", "lora", "chunked", "kdtune, LoRA, chunked"),
        Variant("kdtune_lora_fused", "kdtune", "lora", "fused", "kdtune, LoRA, fused"),
        Variant("kdtune_full_chunked", "kdtune", "full", "chunked", "kdtune, full, chunked"),
        Variant("kdtune_full_fused", "kdtune", "full", "fused", "kdtune, full, fused"),
        Variant(
            "kdtune_full_cached",
            "kdtune",
            "full",
            "chunked",
            "kdtune, full, chunked, cached top-128",
            cached=True,
        ),
        Variant(
            "kdtune_full_on_policy",
            "kdtune",
            "full",
            "chunked",
            "kdtune, full, chunked, on-policy (32 new tokens)",
            on_policy=True,
        ),
        Variant("kdtune_lora_ce", "kdtune", "lora", "ce", "kdtune, LoRA, CE only (floor)"),
        Variant("kdtune_full_ce", "kdtune", "full", "ce", "kdtune, full, CE only (floor)"),
    )
}
BASELINE = "torchtune_lora"
CONTENDED = "+competitor"
QUICK = ["torchtune_lora", "kdtune_lora_chunked", "kdtune_lora_fused", "kdtune_full_chunked"]
QUICK += ["kdtune_full_fused", "kdtune_full_cached", "kdtune_full_on_policy", "kdtune_full_ce"]


COMPETITOR = """
import torch
torch.manual_seed(0)
torch.set_num_threads(2)
model = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 1024))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
x = torch.randn(256, 1024)
while True:
    optimizer.zero_grad()
    model(x).square().mean().backward()
    optimizer.step()
"""
"""The competing job of ``--contention``: another 2-thread PyTorch training process (an MLP
step loop, fp32) that runs for the whole of a measured run."""


def start_competitor() -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):  # the competitor: libgomp's defaults
        env.pop(name, None)
    return subprocess.Popen([sys.executable, "-c", COMPETITOR], env=env)


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


# ------------------------------------------------------------------------------------------------
# Data and configs


SETUP_RECORD_TOKENS = 128
"""``kdtune smollm2 setup`` cuts its text records at 127 tokens."""


def write_data(real: Path, work: Path, records: int, max_seq_len: int) -> dict[str, Path]:
    """``records`` text records that fill ``max_seq_len`` tokens (the set-up's 127-token records
    joined in consecutive groups of ``max_seq_len // 128``), and instruct records made from
    them."""
    group = max(1, max_seq_len // SETUP_RECORD_TOKENS)
    pieces = [r["text"] for r in json.loads((real / "data" / "train.json").read_text())]
    texts = ["".join(pieces[i : i + group]) for i in range(0, group * records, group)]
    text_path = work / "train.json"
    text_path.write_text(json.dumps([{"text": t} for t in texts]))
    instruct = [
        {
            "input": "Continue this text from Python's documentation:\n" + t[:200],
            "output": t[200:600],
        }
        for t in texts
    ]
    instruct_path = work / "instruct.json"
    instruct_path.write_text(json.dumps(instruct))
    return {"text": text_path, "instruct": instruct_path}


def _checkpointer(folder: Path, output_dir: str) -> dict:
    return {
        "_component_": "torchtune.training.FullModelHFCheckpointer",
        "checkpoint_dir": str(folder),
        "checkpoint_files": ["model.safetensors"],
        "model_type": "LLAMA3_2",
        "output_dir": output_dir,
    }


def _dataset(data: dict[str, Path], instruct: bool) -> dict:
    if instruct:
        return {
            "_component_": "torchtune.datasets.instruct_dataset",
            "source": "json",
            "data_files": str(data["instruct"]),
            "split": "train",
            "train_on_input": False,
            "packed": False,
        }
    return {
        "_component_": "torchtune.datasets.text_completion_dataset",
        "source": "json",
        "data_files": str(data["text"]),
        "column": "text",
        "split": "train",
        "packed": False,
    }


def config(args: argparse.Namespace, data: dict[str, Path], variant: Variant, work: Path) -> dict:
    output_dir = str(work / variant.name)
    real = args.real.resolve()
    cfg = {
        "output_dir": output_dir,
        "device": "cpu",
        "dtype": "bf16",
        "seed": 0,
        "tokenizer": {
            "_component_": "kdtune.smollm2.tokenizer.smollm2_tokenizer",
            "path": str(real / "teacher"),
            "max_seq_len": args.max_seq_len,
        },
        "model": LORA_STUDENT if variant.student == "lora" else FULL_STUDENT,
        "checkpointer": _checkpointer(real / "students" / "prune15", output_dir),
        "teacher_model": TEACHER,
        "teacher_checkpointer": _checkpointer(real / "teacher", output_dir),
        "resume_from_checkpoint": False,
        "save_adapter_weights_only": False,
        "dataset": _dataset(data, variant.on_policy),
        "shuffle": True,
        "batch_size": args.batch_size,
        "gradient_accumulation_steps": 1,
        "epochs": 1,
        "max_steps_per_epoch": args.steps,
        "kd_ratio": 0.5,
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": 2e-4, "weight_decay": 0.0},
        "lr_scheduler": {
            "_component_": "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup",
            "num_warmup_steps": 1,
        },
        "clip_grad_norm": 1.0,
        "compile": False,
        "enable_activation_checkpointing": False,
        "enable_activation_offloading": False,
        "metric_logger": {
            "_component_": "torchtune.training.metric_logging.DiskLogger",
            "log_dir": f"{output_dir}/logs",
        },
        "log_every_n_steps": 1,
        "log_peak_memory_stats": False,
        "loss": {
            "_component_": "torchtune.modules.loss.CEWithChunkedOutputLoss",
            "num_output_chunks": NUM_CHUNKS,
        },
        "kd_loss": {
            "_component_": "torchtune.modules.loss.ForwardKLWithChunkedOutputLoss",
            "num_output_chunks": NUM_CHUNKS,
        },
    }
    if variant.recipe == "torchtune":
        cfg["profiler"] = {
            "_component_": "torchtune.training.setup_torch_profiler",
            "enabled": False,
        }
        return cfg
    cfg["loss"]["_component_"] = "kdtune.losses.CEWithChunkedOutputLoss"
    cfg["kd_loss"]["_component_"] = "kdtune.losses.ForwardKLWithChunkedOutputLoss"
    if variant.loss == "fused":
        cfg["loss"] = None
        cfg["kd_loss"] = {
            "_component_": "kdtune.losses.fused.FusedLinearKDLoss",
            "divergence": "forward_kl",
            "num_chunks": args.fused_num_chunks,
        }
    elif variant.loss == "ce":
        cfg.update(teacher_model=None, teacher_checkpointer=None, kd_loss=None, kd_ratio=0.0)
    cfg["teacher_cache"] = str(work / "teacher_cache") if variant.cached else None
    if variant.on_policy:
        cfg["on_policy"] = {"fraction": 1.0, "max_new_tokens": 32, "source": "student"}
    cfg["keep_last_n_checkpoints"] = 1
    cfg["quantizer"] = variant.quantizer
    cfg["teacher_quantization"] = None  # cache-teacher reads it without a default
    return cfg


def write_config(args: argparse.Namespace, data: dict, variant: Variant, work: Path) -> Path:
    from omegaconf import OmegaConf

    path = work / f"{variant.name}.yaml"
    text = OmegaConf.to_yaml(OmegaConf.create(config(args, data, variant, work)))
    path.write_text(f"# {variant.label}: generated by benchmarks/bench_real.py\n{text}")
    return path


def _env(variant: Variant, threads: int | None, wait_policy: str | None = None) -> dict[str, str]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    if wait_policy is not None:  # the measured runs only, not the competitor
        env["OMP_WAIT_POLICY"] = wait_policy.upper()
    if variant.recipe == "kdtune":
        # what `kdtune run` sets on import (kdtune.OPENMP_SPIN_COUNT); the worker imports torch
        # before kdtune, so it must come from the environment here
        env.setdefault("GOMP_SPINCOUNT", "10000")
    if variant.tree is not None:  # the other tree's kdtune comes first on the path
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [variant.tree, env.get("PYTHONPATH")]))
    return env


def build_cache(args: argparse.Namespace, data: dict, work: Path) -> dict:
    """``kdtune cache-teacher`` for the cached variant (timed, its own process)."""
    variant = VARIANTS["kdtune_full_cached"]
    path = write_config(args, data, variant, work)
    command = ["kdtune", "cache-teacher", "--config", str(path), "--top_k", "128"]
    log = work / "cache_teacher.log"
    started = time.perf_counter()
    load = load_average()
    with log.open("w") as out:
        proc = subprocess.run(
            [sys.executable, "-m", "kdtune.cli.main", *command[1:]],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_env(variant, args.threads, args.omp_wait_policy),
            check=False,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"cache-teacher failed:\n{log.read_text()[-3000:]}")
    manifest = json.loads((work / "teacher_cache" / "manifest.json").read_text())
    stats = json.loads((work / "teacher_cache" / "build_stats.json").read_text())
    seconds = stats["seconds_last_run"]
    return {
        "command": shlex.join(command),
        "build_seconds": seconds,
        "wall_seconds": time.perf_counter() - started,
        "load_before": load,
        "load_after": load_average(),
        "target_tokens": manifest["num_positions"],
        "bytes_per_token": manifest["bytes_per_token"],
        "target_tokens_per_second": manifest["num_positions"] / seconds,
    }


def run(
    args: argparse.Namespace, data: dict, variant: Variant, work: Path, competitor: bool = False
) -> dict:
    """One measured run (a fresh process); ``competitor``: beside :data:`COMPETITOR`."""
    shutil.rmtree(work / variant.name, ignore_errors=True)
    path = write_config(args, data, variant, work)
    command = (
        ["tune", "run", "knowledge_distillation_single_device", "--config", str(path)]
        if variant.recipe == "torchtune"
        else ["kdtune", "run", "knowledge_distillation", "--config", str(path)]
    )
    result = work / f"{variant.name}.result.json"
    spec = {"command": command, "result": str(result)}
    profile = work / f"{variant.name}.profile.txt"
    if args.profile:
        # the last step is profiled and left out of the median
        spec.update(profile_after=args.steps - 1, profile=str(profile))
    log = work / f"{variant.name}.log"
    load = load_average()
    started = time.perf_counter()
    other = start_competitor() if competitor else None
    try:
        with log.open("w") as out:
            proc = subprocess.run(
                [sys.executable, str(HERE / "bench_recipe.py"), "--worker", json.dumps(spec)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=_env(variant, args.threads, args.omp_wait_policy),
                check=False,
            )
    finally:
        if other is not None:
            other.kill()
            other.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"{variant.name} failed:\n{log.read_text()[-3000:]}")
    raw = json.loads(result.read_text())
    if args.profile:
        raw["stamps"], raw["vmhwm_kib_after_steps"] = (
            raw["stamps"][:-1],
            raw["vmhwm_kib_after_steps"][:-1],
        )
    summary = bench_recipe.summarize(raw, args.warmup)
    cpu = raw.get("cpu_stamps", [])[: len(raw["stamps"])]
    cpu_intervals = [b - a for a, b in itertools.pairwise(cpu)][max(args.warmup - 1, 0) :]
    summary["cpu_seconds_median"] = statistics.median(cpu_intervals) if cpu_intervals else None
    row = {
        **summary,
        "wall_seconds": time.perf_counter() - started,
        "load_before": load,
        "load_after": load_average(),
        "command": shlex.join(command),
        "tree": variant.tree,
    }
    if args.profile and profile.is_file():
        row["profile"] = profile.read_text()
    if variant.on_policy:
        row["generation_share"] = generation_share(work / variant.name / "metrics.jsonl")
    return row


def generation_share(metrics: Path) -> float | None:
    """Median over an on-policy run's steps of the step time spent sampling
    (``generation_seconds`` / (``generation_seconds`` + ``train_seconds``), metrics.jsonl)."""
    shares = []
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            step = json.loads(line)
            if "generation_seconds" in step and "train_seconds" in step:
                total = step["generation_seconds"] + step["train_seconds"]
                shares.append(step["generation_seconds"] / total if total else 0.0)
    return statistics.median(shares) if shares else None


# ------------------------------------------------------------------------------------------------
# Table


def table(results: dict[str, dict], labels: dict[str, str]) -> str:
    base = results.get(BASELINE)
    lines = [
        "| run | step (s, median) | vs torchtune | CPU s/step | vs torchtune | tokens/s "
        "| peak RSS (GiB) | vs torchtune | load (1-min avg) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in results.items():
        step, rss = r["step_seconds_median"], r["peak_rss_gib"]
        ratio = f"{step / base['step_seconds_median']:.2f}x" if base else "-"
        rss_ratio = f"{rss / base['peak_rss_gib']:.2f}x" if base else "-"
        cpu = r["cpu_seconds_median"]
        cpu_ratio = f"{cpu / base['cpu_seconds_median']:.2f}x" if base else "-"
        loads = ", ".join(f"{run['load_before']:.1f}-{run['load_after']:.1f}" for run in r["runs"])
        lines.append(
            f"| {labels[name]} | {step:.2f} | {ratio} | {cpu:.2f} | {cpu_ratio} | "
            f"{r['tokens_per_step'] / step:.0f} | "
            f"{rss:.2f} | {rss_ratio} | {loads} |"
        )
    return "\n".join(lines)


def contention_summary(results: dict[str, dict], labels: dict[str, str]) -> str:
    """Each variant's slowdown beside the competitor (contended / alone median step), and each
    slowdown against the CE-only variant's (the issue's target: KD within 1.3x of CE's)."""
    slowdowns = {
        name: results[name + CONTENDED]["step_seconds_median"]
        / results[name]["step_seconds_median"]
        for name in results
        if name + CONTENDED in results
    }
    floor = next((slowdowns[n] for n in slowdowns if n.endswith("_ce")), None)
    lines = ["| run | slowdown beside the competitor | vs CE-only's slowdown |", "|---|---:|---:|"]
    for name, slowdown in slowdowns.items():
        versus = f"{slowdown / floor:.2f}x" if floor else "-"
        lines.append(f"| {labels[name]} | {slowdown:.2f}x | {versus} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS))
    parser.add_argument("--real", type=Path, default=REPO / "kdtune_real")
    parser.add_argument("--records", type=int, default=48, help="text records used (and cached)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--fused-num-chunks", type=int, default=NUM_CHUNKS)
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the runs")
    parser.add_argument(
        "--omp-wait-policy",
        choices=("passive", "active"),
        default=None,
        help="OMP_WAIT_POLICY of the measured runs (default: the environment's; unset, libgomp "
        "spins a while before it sleeps)",
    )
    parser.add_argument("--before", type=Path, default=None, help="a folder holding kdtune/")
    parser.add_argument("--profile", action="store_true", help="top ops of one step per run")
    parser.add_argument("--quick", action="store_true", help="4 steps, 1 round, 24 records")
    parser.add_argument(
        "--contention",
        action="store_true",
        help="run each variant alone and beside a competing 2-thread PyTorch training process "
        "(interleaved); reports each variant's slowdown",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "real_cpu.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.repeats, args.records = 4, 1, 1, 24
    if not (args.real / "teacher" / "model.safetensors").is_file():
        parser.error(f"--real {args.real}: no teacher/model.safetensors (kdtune smollm2 setup)")
    names = args.variants or (QUICK if args.quick else list(VARIANTS))
    variants = [VARIANTS[n] for n in names]
    if args.before is not None:
        tree = str(args.before.resolve())
        variants += [
            Variant(
                f"{v.name}@before",
                v.recipe,
                v.student,
                v.loss,
                f"{v.label} (before)",
                v.cached,
                v.on_policy,
                tree,
            )
            for v in variants
            if v.recipe == "kdtune"
        ]
    labels = {v.name: v.label for v in variants}
    schedule = [(v, False) for v in variants]
    if args.contention:
        schedule = [(v, competitor) for v in variants for competitor in (False, True)]
        labels |= {
            v.name + CONTENDED: f"{v.label}, beside a 2-thread training job" for v in variants
        }
    runs: dict[str, list[dict]] = {name: [] for name in labels}
    with tempfile.TemporaryDirectory(prefix="kdtune_bench_real_") as tmp:
        work = Path(tmp)
        data = write_data(args.real, work, args.records, args.max_seq_len)
        cache = None
        if any(v.cached for v in variants):
            cache = build_cache(args, data, work)
            print(f"teacher cache: {cache}", flush=True)
        for repeat in range(args.repeats):
            for v, competitor in schedule:
                row = run(args, data, v, work, competitor)
                runs[v.name + (CONTENDED if competitor else "")].append(row)
                print(
                    f"[{repeat + 1}/{args.repeats}] {v.label}: {row['step_seconds_median']:.2f} "
                    f"s/step, peak RSS {row['peak_rss_gib']:.2f} GiB, load "
                    f"{row['load_before']:.1f}-{row['load_after']:.1f}",
                    flush=True,
                )
    tokens_per_step = args.batch_size * args.max_seq_len
    results = {
        name: {
            "step_seconds_median": statistics.median(r["step_seconds_median"] for r in rows),
            "peak_rss_gib": statistics.median(r["peak_rss_gib"] for r in rows),
            "cpu_seconds_median": statistics.median(
                r["cpu_seconds_median"] or float("nan") for r in rows
            ),
            "tokens_per_step": tokens_per_step,
            "runs": rows,
        }
        for name, rows in runs.items()
    }
    text = table(results, labels)
    for name, rows in runs.items():
        shares = [r["generation_share"] for r in rows if r.get("generation_share") is not None]
        if shares:
            results[name]["generation_share"] = statistics.median(shares)
            text += (
                f"\n\n{labels[name]}: {statistics.median(shares):.0%} of each step samples the "
                "completions (median over steps and rounds, metrics.jsonl's generation_seconds); "
                "the rest is the teacher's and the student's forward, the backward and the update."
            )
    if args.contention:
        text += "\n\n" + contention_summary(results, labels)
    header = (
        f"SmolLM2-135M-Instruct -> 15-layer pruned student, bf16, CPU, batch {args.batch_size} x "
        f"{args.max_seq_len} tokens (tokens/s counts padded positions), {args.steps} steps "
        f"(median after {args.warmup}), {args.repeats} interleaved round(s); a shared machine: "
        "compare within this table only"
    )
    print(f"\n{header}\n\n{text}")
    payload = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": bench_recipe.machine_info(),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "teacher_cache": cache,
        "results": results,
        "header": header,
        "table": text,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(f"{header}\n\n{text}\n")
    print(f"\nwritten to {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
