"""kdtune's sampler (``training.generation.generate``) against transformers' ``generate``.

The same real SmolLM2 folder (``./kdtune_real/teacher`` by default) loaded by both, bf16, the
same left-padded batch of chat prompts, greedy decoding of exactly ``--new`` tokens (no stop
token, so both do the same work), interleaved rounds in one process; tokens/s = generated
tokens / wall seconds (prefill included), with process CPU seconds and the load average.
kdtune's model is in the 8-chunk output mode the recipe leaves it in. ``kdtune_unfused`` is
kdtune's sampler without its fused projections (``FUSED_COPY_BUDGET_BYTES = 0``), to show what
the fusion gives in the same run.

    python benchmarks/bench_generate.py --rounds 3 --new 32
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
    parser.add_argument("--folder", type=Path, default=HERE.parent / "kdtune_real" / "teacher")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "generate_real.json")
    args = parser.parse_args(argv)

    from torchtune.data import Message
    from transformers import AutoModelForCausalLM

    from kdtune.smollm2.evaluate import load_smollm2
    from kdtune.smollm2.tokenizer import SmolLM2Tokenizer
    from kdtune.training import decode_attention
    from kdtune.training.generation import SamplingOptions, generate

    tokenizer = SmolLM2Tokenizer(args.folder)
    questions = [
        "What does the assert statement do in Python?",
        "Explain list comprehensions.",
        "How do I open a file?",
        "What is a decorator, briefly?",
    ]
    prompts = [
        tokenizer.tokenize_messages(
            [Message("user", q), Message("assistant", "")], add_end_tokens=False
        )[0]
        for q in questions
    ]
    ours = load_smollm2(args.folder).to(torch.bfloat16)
    ours.set_num_output_chunks(8)
    theirs = AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.bfloat16).eval()
    pad = tokenizer.pad_id
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    options = SamplingOptions(max_new_tokens=args.new, temperature=0.0)

    def kdtune_arm() -> int:
        out = generate(
            ours,
            prompts,
            options,
            seeds=[0] * len(prompts),
            stop_ids=[],
            pad_id=pad,
            cache_dtype=torch.bfloat16,
        )
        return sum(len(t) for t in out.tokens)

    def transformers_arm() -> int:
        with torch.no_grad():
            out = theirs.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=args.new,
                min_new_tokens=args.new,
                do_sample=False,
                pad_token_id=pad,
            )
        return int((out.shape[1] - width) * out.shape[0])

    def kdtune_unfused_arm() -> int:
        budget = decode_attention.FUSED_COPY_BUDGET_BYTES
        decode_attention.FUSED_COPY_BUDGET_BYTES = 0
        try:
            return kdtune_arm()
        finally:
            decode_attention.FUSED_COPY_BUDGET_BYTES = budget

    arms = {
        "kdtune": kdtune_arm,
        "transformers": transformers_arm,
        "kdtune_unfused": kdtune_unfused_arm,
    }
    for arm in arms.values():  # warm-up
        arm()
    rows: dict[str, list[dict]] = {name: [] for name in arms}
    for _ in range(args.rounds):
        for name, arm in arms.items():
            load, wall, cpu = load_average(), time.perf_counter(), time.process_time()
            tokens = arm()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            rows[name].append({"tok_s": tokens / wall, "tok_per_cpu_s": tokens / cpu, "load": load})
    summary = {
        name: {
            "tok_s_median": statistics.median(r["tok_s"] for r in runs),
            "tok_per_cpu_s_median": statistics.median(r["tok_per_cpu_s"] for r in runs),
            "runs": runs,
        }
        for name, runs in rows.items()
    }
    for name, s in summary.items():
        loads = ", ".join(f"{r['load']:.1f}" for r in s["runs"])
        print(
            f"{name}: {s['tok_s_median']:.1f} tok/s, {s['tok_per_cpu_s_median']:.1f} per "
            f"CPU-second (load {loads})"
        )
    payload = {
        "command": " ".join([sys.executable, *sys.argv]),
        "batch": len(prompts),
        "new_tokens": args.new,
        "torch_threads": torch.get_num_threads(),
        "summary": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
