"""``kdtune cache-teacher``'s per-batch work against the teacher's forward in a training step.

On the real SmolLM2 teacher (``./kdtune_real``, the shipped ``smollm2/135M_prune15_kd``
config: bf16, batch 4 x 128), one process, interleaved rounds of:

- ``training``: the teacher's no-grad forward as the recipe runs it (8 chunks, each projected
  as a 2-D matmul: ``lm_head.chunked_logits``);
- ``build``: the cache build's work for the same batch (``_ShardBuilder._encode_batch``:
  hidden states, projection of the target positions, top-k log-probs, encoding).

Reports target tokens/s (wall and process CPU time) per round, the load average, and with
``--profile`` the top ops of one build batch.

    python benchmarks/bench_cache_build.py --rounds 3 --profile
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real", type=Path, default=HERE.parent / "kdtune_real")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=2, help="batches per arm per round")
    parser.add_argument("--top_k", type=int, default=128)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "cache_build_real.json")
    args = parser.parse_args(argv)

    from kdtune.teacher_cache.build import BuildOptions, _ShardBuilder
    from kdtune.training.config.loading import load_config, resolve_config
    from kdtune.training.data import shift_labels
    from kdtune.training.lm_head import chunked_logits

    cfg = load_config(
        resolve_config("smollm2/135M_prune15_kd"),
        [f"assets_dir={args.real.resolve()}", "teacher_cache=/tmp/unused_teacher_cache"],
    )
    builder = _ShardBuilder(cfg, BuildOptions(top_k=args.top_k), torch.device("cpu"))
    from kdtune.teacher_cache.build import _load_teacher, _plan

    builder.start(_plan(cfg, builder.options, len(builder.dataset), 128))
    teacher = builder.teacher = _load_teacher(cfg, torch.device("cpu"))
    teacher.set_num_output_chunks(8)
    batches = []
    for b in range(args.batches):
        batch = builder.collate([builder.dataset[i] for i in range(4 * b, 4 * b + 4)])
        batches.append((batch["tokens"], shift_labels(batch["labels"], builder.ignore_index)))
    targets = sum(int((labels != builder.ignore_index).sum()) for _, labels in batches)

    def training() -> None:
        with torch.no_grad():
            for tokens, _ in batches:
                chunked_logits(teacher, tokens)

    def build() -> None:
        with torch.no_grad():
            for tokens, labels in batches:
                builder._encode_batch(tokens, labels)

    arms = {"training": training, "build": build}
    training(), build()  # warm-up
    rows: dict[str, list[dict]] = {name: [] for name in arms}
    for _ in range(args.rounds):
        for name, arm in arms.items():
            load, wall, cpu = load_average(), time.perf_counter(), time.process_time()
            arm()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            rows[name].append(
                {"tok_s_wall": targets / wall, "tok_s_cpu": targets / cpu, "load": load}
            )
    summary = {
        name: {
            "tok_s_wall_median": statistics.median(r["tok_s_wall"] for r in runs),
            "tok_s_cpu_median": statistics.median(r["tok_s_cpu"] for r in runs),
            "runs": runs,
        }
        for name, runs in rows.items()
    }
    for name, s in summary.items():
        loads = ", ".join(f"{r['load']:.1f}" for r in s["runs"])
        print(
            f"{name}: {s['tok_s_wall_median']:.0f} target tok/s wall, "
            f"{s['tok_s_cpu_median']:.0f} per CPU-second (load {loads})"
        )
    profile = None
    if args.profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            build()
        profile = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
        print(profile)
    payload = {
        "command": " ".join([sys.executable, *sys.argv]),
        "torch_threads": torch.get_num_threads(),
        "target_tokens_per_arm": targets,
        "summary": summary,
        "profile": profile,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
