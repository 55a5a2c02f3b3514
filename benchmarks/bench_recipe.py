"""Recipe-level CPU benchmark: torchtune 0.6.1's KD recipe against kdtune's, same config.

torchtune's ``knowledge_distillation_single_device`` recipe (run as ``tune run
knowledge_distillation_single_device --config <generated yaml>``) and kdtune's
``knowledge_distillation`` recipe (``kdtune run knowledge_distillation --config <generated
yaml>``) train the same LoRA student (torchtune's KD recipes support only LoRA students) from
the same teacher on the same data, batch, sequence length and steps. The models are the tiny
Llama-3 networks of :mod:`kdtune.assets` with the real Llama-3 vocabulary (128,256 rows), so the
vocabulary-sized logits dominate memory and time as they do in real distillation. kdtune also
runs its fused loss (LoRA and full-parameter students), which never materialises the logits.

The ``*_cached`` variants train the same students from a teacher cache (``teacher_cache``: the
teacher's top-128 log-probs, built once by ``kdtune cache-teacher`` before the runs, timed): no
teacher is built or loaded. Their ratios are against the same kdtune variant with the online
teacher (targets: step time <= 0.6x, peak RSS below); the cache's build time and bytes per
token are printed and saved too.

Every run is a fresh process (``--worker``) that executes the recipe through its command-line
entry point. In the worker, a global optimizer post-step hook records a timestamp after every
optimizer step, and the resident-set high-water mark (``VmHWM``) after the last one:

- step time: median of the step-to-step intervals after ``--warmup`` steps (forward,
  backward, optimizer step and the data loading between them, as the user waits for it);
- peak RSS: ``VmHWM`` of the whole process at the end of the last training step (setup
  included, the final checkpoint save excluded).

With ``--repeats N`` every variant runs N times in round-robin order and the table gives the
medians (on a shared machine a slow spell then hits every variant alike). The table (ratios
against torchtune) is printed and written as JSON with machine, versions, settings, every
run's step times and the command::

    python benchmarks/bench_recipe.py                      # ~4-5 minutes on 2 cores
    python benchmarks/bench_recipe.py --repeats 2          # ~9 minutes; what docs/benchmarks.md reports
    python benchmarks/bench_recipe.py --steps 8 --warmup 2 --variants torchtune_lora kdtune_lora_fused
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# Options shared by every variant: the same student, teacher, data, batch and schedule.
LORA_STUDENT = {
    "_component_": "kdtune.assets.models.lora_tiny_student",
    "vocab_size": 128_256,
    "lora_attn_modules": ["q_proj", "k_proj", "v_proj", "output_proj"],
    "apply_lora_to_mlp": True,
    "apply_lora_to_output": False,
    "lora_rank": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
}
FULL_STUDENT = {"_component_": "kdtune.assets.models.tiny_student", "vocab_size": 128_256}
TEACHER = {"_component_": "kdtune.assets.models.tiny_teacher", "vocab_size": 128_256}
NUM_CHUNKS = 8  # torchtune's default num_output_chunks


@dataclass(frozen=True)
class Variant:
    name: str
    recipe: str  # "torchtune" or "kdtune"
    student: str  # "lora" or "full"
    loss: str  # "chunked" or "fused"
    label: str
    cached: bool = False  # train from the teacher cache (no teacher model)

    @property
    def online(self) -> str:
        """The variant with the online teacher that a cached one is compared with."""
        return self.name.removesuffix("_cached")


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("torchtune_lora", "torchtune", "lora", "chunked", "torchtune 0.6.1, LoRA, chunked"),
        Variant("kdtune_lora_chunked", "kdtune", "lora", "chunked", "kdtune, LoRA, chunked"),
        Variant("kdtune_lora_fused", "kdtune", "lora", "fused", "kdtune, LoRA, fused"),
        Variant("kdtune_full_fused", "kdtune", "full", "fused", "kdtune, full-parameter, fused"),
        Variant(
            "kdtune_lora_chunked_cached",
            "kdtune",
            "lora",
            "chunked",
            "kdtune, LoRA, chunked, cached top-128 teacher",
            cached=True,
        ),
        Variant(
            "kdtune_full_fused_cached",
            "kdtune",
            "full",
            "fused",
            "kdtune, full-parameter, fused, cached top-128 teacher",
            cached=True,
        ),
    )
}
BASELINE = "torchtune_lora"


@dataclass(frozen=True)
class Settings:
    assets: str
    work: str
    batch_size: int
    max_seq_len: int
    steps: int
    warmup: int
    lr: float
    fused_num_chunks: int | None = NUM_CHUNKS  # None: the fused loss's memory budget alone


# ------------------------------------------------------------------------------------------------
# Configs (plain dicts written as YAML)


def _common(settings: Settings, output_dir: str) -> dict:
    a = settings.assets
    checkpointer = {
        "_component_": "torchtune.training.FullModelHFCheckpointer",
        "checkpoint_files": ["model.safetensors"],
        "model_type": "LLAMA3",
        "output_dir": output_dir,
    }
    return {
        "output_dir": output_dir,
        "device": "cpu",
        "dtype": "fp32",
        "seed": 0,
        "tokenizer": {
            "_component_": "torchtune.models.llama3.llama3_tokenizer",
            "path": f"{a}/tokenizer.model",
            "special_tokens_path": f"{a}/special_tokens.json",
            "max_seq_len": settings.max_seq_len,
        },
        "checkpointer": {**checkpointer, "checkpoint_dir": f"{a}/student"},
        "teacher_model": TEACHER,
        "teacher_checkpointer": {**checkpointer, "checkpoint_dir": f"{a}/teacher"},
        "resume_from_checkpoint": False,
        "save_adapter_weights_only": False,
        "dataset": {
            "_component_": "torchtune.datasets.alpaca_dataset",
            "source": "json",
            "data_files": f"{a}/data/train.json",
            "split": "train",
            "train_on_input": False,
            "packed": False,
        },
        "shuffle": True,
        "batch_size": settings.batch_size,
        "gradient_accumulation_steps": 1,
        "epochs": 1,
        "max_steps_per_epoch": settings.steps,
        "kd_ratio": 0.5,
        # fused AdamW, as the shipped full-parameter configs (and torchtune's) use
        "optimizer": {
            "_component_": "torch.optim.AdamW",
            "lr": settings.lr,
            "weight_decay": 0.0,
            "fused": True,
        },
        "lr_scheduler": {
            "_component_": "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup",
            "num_warmup_steps": 1,
        },
        "clip_grad_norm": 1.0,
        "compile": False,
        "enable_activation_checkpointing": False,
        "metric_logger": {
            "_component_": "torchtune.training.metric_logging.DiskLogger",
            "log_dir": f"{output_dir}/logs",
        },
        "log_every_n_steps": 1,
    }


def torchtune_config(settings: Settings, output_dir: str) -> dict:
    return {
        **_common(settings, output_dir),
        "model": LORA_STUDENT,
        "loss": {
            "_component_": "torchtune.modules.loss.CEWithChunkedOutputLoss",
            "num_output_chunks": NUM_CHUNKS,
        },
        "kd_loss": {
            "_component_": "torchtune.modules.loss.ForwardKLWithChunkedOutputLoss",
            "num_output_chunks": NUM_CHUNKS,
        },
        "enable_activation_offloading": False,
        "log_peak_memory_stats": False,
        "profiler": {"_component_": "torchtune.training.setup_torch_profiler", "enabled": False},
    }


def kdtune_config(settings: Settings, output_dir: str, variant: Variant) -> dict:
    if variant.loss == "fused":
        losses = {
            "loss": None,
            "kd_loss": {
                "_component_": "kdtune.losses.fused.FusedLinearKDLoss",
                "divergence": "forward_kl",
                "num_chunks": settings.fused_num_chunks,
            },
        }
    else:
        losses = {
            "loss": {
                "_component_": "kdtune.losses.CEWithChunkedOutputLoss",
                "num_output_chunks": NUM_CHUNKS,
            },
            "kd_loss": {
                "_component_": "kdtune.losses.ForwardKLWithChunkedOutputLoss",
                "num_output_chunks": NUM_CHUNKS,
            },
        }
    return {
        **_common(settings, output_dir),
        "model": LORA_STUDENT if variant.student == "lora" else FULL_STUDENT,
        **losses,
        # torchtune's recipe has no deterministic mode by default; neither does this run
        "deterministic": False,
        "teacher_quantization": None,
        "teacher_cache": f"{settings.work}/teacher_cache" if variant.cached else None,
        "validation_dataset": None,
        "validation_batch_size": 1,
        "validate_every_n_steps": None,
        "validation_max_batches": None,
        "stop_after_steps": None,
        "save_every_n_steps": None,
        "keep_last_n_checkpoints": None,
        "fsdp_cpu_offload": False,
        "fsdp_reshard_after_forward": True,
        "fsdp_teacher_reshard_after_forward": True,
    }


def write_config(settings: Settings, variant: Variant) -> Path:
    from omegaconf import OmegaConf

    output_dir = f"{settings.work}/{variant.name}"
    cfg = (
        torchtune_config(settings, output_dir)
        if variant.recipe == "torchtune"
        else kdtune_config(settings, output_dir, variant)
    )
    path = Path(settings.work) / f"{variant.name}.yaml"
    header = f"# {variant.label}: generated by benchmarks/bench_recipe.py\n"
    path.write_text(header + OmegaConf.to_yaml(OmegaConf.create(cfg)))
    return path


CACHE_TOP_K = 128


def build_cache(settings: Settings, variant: Variant) -> dict:
    """``kdtune cache-teacher`` with a cached variant's config, in a fresh process (timed)."""
    config_path = write_config(settings, variant)
    command = ["kdtune", "cache-teacher", "--config", str(config_path), "--top_k", str(CACHE_TOP_K)]
    log_path = Path(settings.work) / "cache_teacher.log"
    started = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.run(
            [sys.executable, "-m", "kdtune.cli.main", *command[1:]],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
            check=False,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"cache-teacher failed; log tail:\n{log_path.read_text()[-3000:]}")
    folder = Path(settings.work) / "teacher_cache"
    manifest = json.loads((folder / "manifest.json").read_text())
    stats = json.loads((folder / "build_stats.json").read_text())
    return {
        "command": shlex.join(command),
        "wall_seconds": time.perf_counter() - started,
        "build_seconds": stats["seconds_last_run"],
        "top_k": manifest["top_k"],
        "target_tokens": manifest["num_positions"],
        "bytes": manifest["bytes"],
        "bytes_per_token": manifest["bytes_per_token"],
        "bytes_per_position": manifest["encoding"]["bytes_per_position"],
    }


def command_line(variant: Variant, config_path: Path) -> list[str]:
    """The user-facing command this variant runs (the worker calls the same entry point)."""
    if variant.recipe == "torchtune":
        return ["tune", "run", "knowledge_distillation_single_device", "--config", str(config_path)]
    return ["kdtune", "run", "knowledge_distillation", "--config", str(config_path)]


# ------------------------------------------------------------------------------------------------
# Worker: one recipe run per process


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def run_worker(spec: dict) -> None:
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    stamps: list[float] = []
    peaks: list[int] = []
    # optional: profile the optimizer step after this many steps (spec["profile"]: a path)
    profile_after = spec.get("profile_after")
    profiler: list = []

    cpu_stamps: list[float] = []  # process CPU time (all threads): less sensitive to load

    def after_step(optimizer, args, kwargs) -> None:
        stamps.append(time.perf_counter())
        cpu_stamps.append(time.process_time())
        peaks.append(_status_kib("VmHWM"))
        if profile_after is not None and len(stamps) == profile_after:
            profiler.append(
                torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            )
            profiler[0].__enter__()
        elif profiler and len(stamps) == profile_after + 1:
            profiler[0].__exit__(None, None, None)
            averages = profiler[0].key_averages()
            Path(spec["profile"]).write_text(
                averages.table(
                    sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=40
                )
            )

    register_optimizer_step_post_hook(after_step)
    argv = spec["command"]
    started = time.perf_counter()
    try:
        if argv[0] == "tune":
            from torchtune._cli.tune import main as tune_main

            sys.argv = argv
            tune_main()
        else:
            from kdtune.cli.main import main as kdtune_main

            kdtune_main(argv[1:])
    except SystemExit as stop:  # the recipe scripts end with sys.exit(recipe_main())
        if stop.code not in (None, 0):
            raise
    result = {
        "stamps": [t - started for t in stamps],
        "cpu_stamps": cpu_stamps,
        "vmhwm_kib_after_steps": peaks,
        "vmhwm_kib_at_exit": _status_kib("VmHWM"),
        "torch_threads": torch.get_num_threads(),
    }
    Path(spec["result"]).write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------------
# Driver


def summarize(raw: dict, warmup: int) -> dict:
    stamps = raw["stamps"]
    intervals = [b - a for a, b in itertools.pairwise(stamps)]
    timed = intervals[max(warmup - 1, 0) :]  # interval i ends at step i + 2
    if not timed:
        raise RuntimeError(f"too few steps ({len(stamps)}) for warmup={warmup}")
    return {
        "steps": len(stamps),
        "step_seconds_median": statistics.median(timed),
        "step_seconds_all": intervals,
        "peak_rss_gib": raw["vmhwm_kib_after_steps"][-1] / 2**20,
        "peak_rss_gib_at_exit": raw["vmhwm_kib_at_exit"] / 2**20,
        "torch_threads": raw["torch_threads"],
    }


def run_variant(settings: Settings, variant: Variant, threads: int | None) -> dict:
    # a fresh output_dir each run: a repeat must not resume from (or trip over) the last one
    shutil.rmtree(Path(settings.work) / variant.name, ignore_errors=True)
    config_path = write_config(settings, variant)
    command = command_line(variant, config_path)
    result_path = Path(settings.work) / f"{variant.name}.result.json"
    spec = {"command": command, "result": str(result_path)}
    log_path = Path(settings.work) / f"{variant.name}.log"
    started = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(spec)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={
                **os.environ,
                "TOKENIZERS_PARALLELISM": "false",
                **({"OMP_NUM_THREADS": str(threads)} if threads is not None else {}),
            },
            check=False,
        )
    if proc.returncode != 0:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"{variant.name} failed (exit {proc.returncode}); log tail:\n{tail}")
    summary = summarize(json.loads(result_path.read_text()), settings.warmup)
    return {
        **summary,
        "wall_seconds": time.perf_counter() - started,
        "command": shlex.join(command),
        "config": config_path.read_text(),
    }


def combine(repeats: list[dict]) -> dict:
    """One variant's row: medians over its repeated runs, and every run kept."""
    return {
        "step_seconds_median": statistics.median(r["step_seconds_median"] for r in repeats),
        "peak_rss_gib": statistics.median(r["peak_rss_gib"] for r in repeats),
        "runs": repeats,
    }


def machine_info() -> dict:
    import torch
    import torchtune

    import kdtune

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchtune": torchtune.__version__,
        "kdtune": kdtune.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }


def _ratio(value: float, base: dict | None, key: str) -> str:
    return f"{value / base[key]:.2f}x" if base else "-"


def table(results: dict[str, dict]) -> str:
    """Each run against torchtune; a cached run also against the same run with its teacher."""
    base = results.get(BASELINE)
    lines = [
        "| run | step time (s, median) | vs torchtune | vs online teacher | peak RSS (GiB) "
        "| vs torchtune | vs online teacher |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        variant = VARIANTS[name]
        online = results.get(variant.online) if variant.cached else None
        step, rss = r["step_seconds_median"], r["peak_rss_gib"]
        lines.append(
            f"| {variant.label} | {step:.3f} | {_ratio(step, base, 'step_seconds_median')} | "
            f"{_ratio(step, online, 'step_seconds_median')} | {rss:.2f} | "
            f"{_ratio(rss, base, 'peak_rss_gib')} | {_ratio(rss, online, 'peak_rss_gib')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the median")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument(
        "--fused-num-chunks",
        default=str(NUM_CHUNKS),
        help="kd_loss.num_chunks of the fused variants: an int (default: torchtune's 8 chunks) "
        "or 'none' (rows per chunk from the loss's memory budget alone, its default)",
    )
    parser.add_argument("--assets", type=Path, default=None, help="tiny llama3-vocab assets")
    parser.add_argument(
        "--threads", type=int, default=None, help="OMP_NUM_THREADS of the runs (default: torch's)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs per variant, in round-robin order (a busy machine's slow spells then hit "
        "every variant alike); the table gives the median over repeats",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "recipe_cpu_idle.json")
    args = parser.parse_args(argv)
    if args.worker is not None:
        run_worker(json.loads(args.worker))
        return 0

    from kdtune.assets import make_tiny_assets

    with tempfile.TemporaryDirectory(prefix="kdtune_bench_recipe_") as work:
        assets_dir = args.assets or Path(work) / "assets"
        assets = make_tiny_assets(assets_dir, vocab="llama3", seed=0)
        settings = Settings(
            assets=str(assets.root),
            work=work,
            batch_size=args.batch_size,
            max_seq_len=args.max_seq_len,
            steps=args.steps,
            warmup=args.warmup,
            lr=args.lr,
            fused_num_chunks=None
            if args.fused_num_chunks.lower() == "none"
            else int(args.fused_num_chunks),
        )
        cached = [VARIANTS[name] for name in args.variants if VARIANTS[name].cached]
        cache = None
        if cached:
            print(f"building the teacher cache (top-{CACHE_TOP_K}) ...", flush=True)
            cache = build_cache(settings, cached[0])
            print(
                f"  {cache['target_tokens']} target tokens, {cache['bytes_per_token']:.1f} "
                f"bytes/token, built in {cache['build_seconds']:.1f} s "
                f"({cache['wall_seconds']:.0f} s with start-up)",
                flush=True,
            )
        runs: dict[str, list[dict]] = {name: [] for name in args.variants}
        for repeat in range(args.repeats):
            for name in args.variants:
                print(
                    f"running {VARIANTS[name].label} ({repeat + 1}/{args.repeats}) ...", flush=True
                )
                r = run_variant(settings, VARIANTS[name], args.threads)
                runs[name].append(r)
                print(
                    f"  {r['steps']} steps, median {r['step_seconds_median']:.3f} s/step, "
                    f"peak RSS {r['peak_rss_gib']:.2f} GiB ({r['wall_seconds']:.0f} s)",
                    flush=True,
                )
    results = {name: combine(repeats) for name, repeats in runs.items()}
    text = table(results)
    print(
        f"\nKD recipe on CPU: vocab 128,256, batch {args.batch_size}, max_seq_len "
        f"{args.max_seq_len}, {args.steps} steps (median after {args.warmup}), "
        f"{args.repeats} run(s) each\n\n{text}"
    )
    if cache is not None:
        print(
            f"\nteacher cache: top-{cache['top_k']}, {cache['bytes_per_token']:.1f} bytes/token "
            f"({cache['bytes_per_position']} per position), {cache['target_tokens']} target "
            f"tokens, built in {cache['build_seconds']:.1f} s (`{cache['command']}`)"
        )
    payload = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": machine_info(),
        "settings": {k: v for k, v in asdict(settings).items() if k not in ("assets", "work")},
        "results": results,
        "teacher_cache": cache,
        "table": text,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
