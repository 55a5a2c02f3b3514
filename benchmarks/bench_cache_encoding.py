"""What the teacher cache's encoding costs: round-trip error, and quality in the demo.

1. Round trip at k = 128 on V = 128,256 (synthetic teacher distributions of three shapes):
   KL(exact (k+1)-bucket distribution || decoded) per position, for several knot counts, with
   the bytes per position.
2. The demo (``kdtune demo``'s task, teacher and students; seeds 0, 1, 2): the forward-KL
   student trained from the cached top-8 with float32 values (no encoding loss), the default
   float16 knots (at k = 8 every rank is a knot), and 4 float16 knots (ranks 5-8 interpolated),
   scored on the held-out answers; the table gives each encoding's true KL relative to
   float32 (the issue's target: within 1 %).

::

    python benchmarks/bench_cache_encoding.py            # ~2 minutes on 2 cores
    python benchmarks/bench_cache_encoding.py --skip-demo
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from kdtune.demo.table import json_safe
from kdtune.teacher_cache.encoding import TopKCodec
from kdtune.teacher_cache.topk import topk_logprobs

RESULTS = Path(__file__).resolve().parent / "results" / "cache_encoding.json"


def synthetic_logits(shape: str, rows: int, vocab: int) -> torch.Tensor:
    """Teacher logits ``[rows, vocab]`` of one of three shapes (see the module doc)."""
    if shape == "gaussian":  # the top 128 hold ~0.8 of the mass
        return 4 * torch.randn(rows, vocab)
    if shape == "power_law":
        ranks = torch.arange(1, vocab + 1).float().log()
        return -1.1 * ranks * 2 * torch.rand(rows, 1) + 0.5 * torch.randn(rows, vocab)
    return 8 * torch.randn(rows, vocab)  # peaked: irregular gaps between the top ranks


def round_trip(knots: tuple[int, ...], rows: int = 128) -> list[dict]:
    torch.manual_seed(0)
    vocab, k = 128_256, 128
    out = []
    for shape in ("gaussian", "power_law", "peaked"):
        ids, logprobs, rest = topk_logprobs(synthetic_logits(shape, rows, vocab), k, 1.0)
        exact = torch.cat([logprobs, rest[:, None]], 1).double()
        for m in knots:
            codec = TopKCodec(k, vocab, m)
            _, d_logprobs, d_rest = codec.decode(*codec.encode(ids, logprobs, rest))
            decoded = torch.cat([d_logprobs, d_rest[:, None]], 1).double()
            kl = (exact.exp() * (exact - decoded)).sum(1)
            entropy = -(exact.exp() * exact).sum(1)
            out.append(
                {
                    "shape": shape,
                    "knots": m,
                    "bytes_per_position": codec.bytes_per_position,
                    "kl_mean": kl.mean().item(),
                    "kl_max": kl.max().item(),
                    "bucket_entropy_mean": entropy.mean().item(),
                }
            )
    return out


# (name, build options, label)
DEMO_ENCODINGS = (
    ("f32", {"knots": 8, "value_dtype": "float32"}, "top-8, float32 values (reference)"),
    ("f16", {"knots": 12, "value_dtype": "float16"}, "top-8, float16 (default encoding)"),
    ("f16_4knots", {"knots": 4, "value_dtype": "float16"}, "top-8, 4 float16 knots"),
)


def demo_quality(out: Path, seeds: list[int]) -> dict:
    from kdtune.demo.pipeline import evaluate_seed, run_overrides, train_variant
    from kdtune.demo.runner import demo_config
    from kdtune.demo.variants import KD_CONFIG, Variant
    from kdtune.demo.workspace import prepare_workspace
    from kdtune.teacher_cache.build import BuildOptions, build_teacher_cache

    ws, _ = prepare_workspace(out, seeds=seeds)
    variants = []
    for name, options, _ in DEMO_ENCODINGS:
        variant = Variant(name, name, KD_CONFIG, (f"teacher_cache={ws.root}/cache_{name}",))
        cfg = demo_config(KD_CONFIG, run_overrides(ws, seeds[0], variant, []))
        build_teacher_cache(cfg, BuildOptions(top_k=8, batch_size=64, **options))
        variants.append(variant)
    per_seed = {}
    for seed in seeds:
        runs = {v.name: train_variant(ws, seed, v, []) for v in variants}
        rows = evaluate_seed(ws, seed, runs, [])
        per_seed[seed] = {v.name: rows[v.name] for v in variants}
        print(
            f"seed {seed}: "
            + ", ".join(f"{n} {r['true_kl']:.4f}" for n, r in per_seed[seed].items())
        )
    return per_seed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    rows = round_trip((8, 12, 16))
    print("| shape | knots | bytes/position | bucket KL mean | bucket KL max |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['shape']} | {r['knots']} | {r['bytes_per_position']} | {r['kl_mean']:.2e} | "
            f"{r['kl_max']:.2e} |"
        )
    payload: dict = {"command": " ".join([sys.executable, *sys.argv]), "round_trip": rows}
    if not args.skip_demo:
        with tempfile.TemporaryDirectory(prefix="kdtune_cache_encoding_") as work:
            per_seed = demo_quality(Path(work), args.seeds)
        print("\n| cache of the demo teacher | held-out true KL (mean) | vs float32, per seed |")
        print("|---|---:|---|")
        for name, _, label in DEMO_ENCODINGS:
            values = [per_seed[s][name]["true_kl"] for s in args.seeds]
            ratios = [
                per_seed[s][name]["true_kl"] / per_seed[s]["f32"]["true_kl"] for s in args.seeds
            ]
            listed = ", ".join(f"{ratio:.4f}" for ratio in ratios)
            print(f"| {label} | {statistics.fmean(values):.4f} | {listed} |")
        payload["demo"] = per_seed
    payload["seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(json_safe(payload), indent=1) + "\n")
    print(f"\nwritten to {args.out} ({payload['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
