"""Cost of fake quantisation in the recipe's training step (issue 24's target: at most 1.3x).

The real pair of :mod:`bench_real` (SmolLM2-135M-Instruct teacher, its 15-layer pruned copy as
a full-parameter student, bf16, CPU, batch 4 x 128 tokens of the real text data), each run a
fresh ``kdtune run knowledge_distillation`` process timed by :mod:`bench_recipe`'s worker
(median optimizer-step interval after ``--warmup`` steps): the whole step, i.e. teacher
forward, student forward and backward, loss and AdamW step. For each loss (``chunked``: 8
chunks; ``fused``) the same step three ways:

- ``plain``: no quantiser;
- ``gguf_q4_0``: ``kdtune.quantization.qat.GGUFQ4_0QATQuantizer`` (llama.cpp Q4_0 projections,
  Q8_0 token embedding and tied head);
- ``torchao_8da4w``: ``torchtune.training.quantization.Int8DynActInt4WeightQATQuantizer``,
  groupsize 32 (int8 per-token activations, int4 weights; the tied head is not quantised).

Runs are interleaved (round-robin over the six, ``--repeats`` rounds); each variant's number is
the median of its runs' medians. The load average (``os.getloadavg()``) is recorded before and
after the whole benchmark and around every run. Ratios are each quantised step over the plain
step with the same loss. ``--profile`` adds each run's top ops (self CPU) of one step.

    python benchmarks/bench_fake_quant.py --real ./kdtune_real --repeats 2 \\
        --out benchmarks/results/fake_quant_step.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_real  # noqa: E402  (benchmarks/ is not a package)
import bench_recipe  # noqa: E402

TARGET = 1.3
QUANTIZERS: dict[str, dict | None] = {
    "plain": None,
    "gguf_q4_0": {"_component_": "kdtune.quantization.qat.GGUFQ4_0QATQuantizer"},
    "torchao_8da4w": {
        "_component_": "torchtune.training.quantization.Int8DynActInt4WeightQATQuantizer",
        "groupsize": 32,
    },
}
LOSSES = ("chunked", "fused")


def variants(
    losses: tuple[str, ...] = LOSSES, quantizers: tuple[str, ...] = tuple(QUANTIZERS)
) -> list[bench_real.Variant]:
    """Every (loss, quantiser) pair as a :class:`bench_real.Variant` of the full student."""
    return [
        bench_real.Variant(
            name=f"{loss}_{quant}",
            recipe="kdtune",
            student="full",
            loss=loss,
            label=f"kdtune, full, {loss}, {quant}",
            quantizer=node,
        )
        for loss in losses
        for quant, node in QUANTIZERS.items()
        if quant in quantizers
    ]


def ratios(medians: dict[str, float]) -> dict[str, float]:
    """``<loss>_<quantiser>`` step over ``<loss>_plain``, for every quantised variant."""
    return {
        name: seconds / medians[f"{name.split('_')[0]}_plain"]
        for name, seconds in medians.items()
        if not name.endswith("_plain")
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real", type=Path, default=bench_real.REPO / "kdtune_real")
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    parser.add_argument("--quantizers", nargs="+", default=list(QUANTIZERS), choices=QUANTIZERS)
    parser.add_argument("--records", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--fused-num-chunks", type=int, default=bench_real.NUM_CHUNKS)
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the runs")
    parser.add_argument("--profile", action="store_true", help="top ops of one step per run")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not (args.real / "students" / "prune15" / "model.safetensors").is_file():
        parser.error(f"--real {args.real}: no students/prune15 (kdtune smollm2 setup)")
    chosen = variants(tuple(args.losses), tuple(args.quantizers))
    runs: dict[str, list[dict]] = {v.name: [] for v in chosen}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="kdtune_bench_fake_quant_") as tmp:
        work = Path(tmp)
        data = bench_real.write_data(args.real, work, args.records, args.max_seq_len)
        for repeat in range(args.repeats):
            for variant in chosen:
                row = bench_real.run(args, data, variant, work)
                runs[variant.name].append(row)
                print(
                    f"[{repeat + 1}/{args.repeats}] {variant.name}: "
                    f"{row['step_seconds_median']:.3f} s/step (CPU {row['cpu_seconds_median']:.2f}"
                    f" s), load {row['load_before']:.2f}-{row['load_after']:.2f}",
                    flush=True,
                )
    load_after = os.getloadavg()
    medians = {
        name: statistics.median(r["step_seconds_median"] for r in rows)
        for name, rows in runs.items()
    }
    cpu_medians = {
        name: statistics.median(r["cpu_seconds_median"] for r in rows)
        for name, rows in runs.items()
    }
    wall_ratios, cpu_ratios = ratios(medians), ratios(cpu_medians)
    print(f"\nload average {load_before} -> {load_after}")
    for name in medians:
        versus = (
            f"  {wall_ratios[name]:.2f}x plain (CPU time {cpu_ratios[name]:.2f}x)"
            if name in wall_ratios
            else ""
        )
        print(f"{name:24s} {medians[name]:.3f} s/step{versus}")
    missed = [name for name, ratio in wall_ratios.items() if ratio > TARGET]
    print(f"target <= {TARGET}x: " + (f"missed by {missed}" if missed else "met by every variant"))
    result = {
        "command": shlex.join(["python", "benchmarks/bench_fake_quant.py", *sys.argv[1:]]),
        "machine": bench_recipe.machine_info(),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "quantizers": QUANTIZERS,
        "load_before": load_before,
        "load_after": load_after,
        "median_step_seconds": medians,
        "median_cpu_seconds": cpu_medians,
        "ratio_to_plain": wall_ratios,
        "cpu_ratio_to_plain": cpu_ratios,
        "target": TARGET,
        "missed": missed,
        "runs": runs,
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
