"""Cost of GGUF fake quantisation in a training step (issue 24's target: at most 1.3x).

The real SmolLM2-135M-Instruct (``--real`` set-up) as a full-parameter student in bf16, its head
in chunked-output mode (8 chunks, as the recipe runs it), batch 4 x 128 tokens: forward, CE over
the chunks, backward, once plain and once prepared with each GGUF quantiser. Variants are
interleaved per round (the machine's speed drifts); medians, the load average before and after,
written to ``--out``::

    python benchmarks/bench_fake_quant.py --root ./kdtune_real --rounds 5 \\
        --out benchmarks/results/fake_quant_step.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kdtune.models import llama_from_hf_folder
from kdtune.quantization.qat import GGUFQ4_0QATQuantizer, GGUFQ8_0QATQuantizer, prepare_student

VARIANTS = {
    "plain": None,
    "gguf_q4_0": GGUFQ4_0QATQuantizer,
    "gguf_q8_0": GGUFQ8_0QATQuantizer,
}


def build(folder: Path, variant: str) -> torch.nn.Module:
    """The teacher folder's model in bf16, prepared with ``variant``'s quantiser, 8 chunks."""
    model = llama_from_hf_folder(folder).to(torch.bfloat16)
    quantizer = VARIANTS[variant]
    if quantizer is not None:
        model = prepare_student(model, quantizer(), torch.bfloat16)
    model.set_num_output_chunks(8)
    return model


def step_seconds(model: torch.nn.Module, tokens: torch.Tensor) -> float:
    """One forward + chunked CE + backward on ``tokens`` ``[B, S]``; seconds."""
    started = time.perf_counter()
    chunks = model(tokens[:, :-1])
    labels = tokens[:, 1:].chunk(len(chunks), dim=1)
    loss = sum(
        F.cross_entropy(c.flatten(0, 1).float(), y.flatten(), reduction="sum")
        for c, y in zip(chunks, labels, strict=True)
    )
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("::")[0].strip())
    parser.add_argument("--root", type=Path, default=Path("./kdtune_real"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    tokens = torch.randint(0, 49152, (args.batch, args.seq_len + 1))
    models = {name: build(args.root / "teacher", name) for name in VARIANTS}
    load_before = os.getloadavg()
    for model in models.values():
        step_seconds(model, tokens)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            times[name].append(step_seconds(model, tokens))
    medians = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "command": "python benchmarks/bench_fake_quant.py " + " ".join(sys.argv[1:]),
        "torch_threads": torch.get_num_threads(),
        "shape": [args.batch, args.seq_len],
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "seconds": times,
        "median_seconds": medians,
        "ratio_to_plain": {name: medians[name] / medians["plain"] for name in medians},
    }
    for name in medians:
        print(f"{name:10s} {medians[name]:.3f} s  {result['ratio_to_plain'][name]:.2f}x plain")
    print(f"load {load_before} -> {result['load_after']}")
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
