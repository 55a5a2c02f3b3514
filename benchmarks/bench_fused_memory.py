"""Peak memory of the fused loss's default chunking against the chunked path, at small vocabularies.

One loss forward + backward at SmolLM2-135M's head shape (batch 4 x 128 tokens, D = 576,
V = 49,152, bf16 inputs, forward KL + CE at kd_ratio 0.5), each mode in a fresh process:
peak RSS above the inputs (``ru_maxrss``) and seconds per call (3 calls). Modes: the chunked
path (8 chunks of 2-D head matmuls, then ``ForwardKLWithChunkedOutputLoss`` +
``CEWithChunkedOutputLoss``), and the fused loss with its default chunking and with
``num_chunks`` 1, 4 and 8::

    python benchmarks/bench_fused_memory.py --out benchmarks/results/fused_default_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

B, S, D, V = 4, 128, 576, 49_152
MODES = ("chunked_8", "fused_default", "fused_1", "fused_4", "fused_8")


def measure(mode: str, calls: int = 3) -> dict:
    """Run ``mode`` in this process; peak RSS (MiB) above the inputs and seconds per call."""
    import torch

    from kdtune.losses import CEWithChunkedOutputLoss, ForwardKLWithChunkedOutputLoss
    from kdtune.losses.fused import FusedLinearKDLoss

    torch.manual_seed(0)
    hidden = torch.randn(B, S, D, dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(V, D) * 0.02).to(torch.bfloat16).requires_grad_(True)
    teacher_hidden = torch.randn(B, S, D, dtype=torch.bfloat16)
    teacher_weight = (torch.randn(V, D) * 0.02).to(torch.bfloat16)
    labels = torch.randint(0, V, (B, S))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    for _ in range(calls):
        if mode.startswith("fused"):
            chunks = None if mode == "fused_default" else int(mode.split("_")[1])
            loss = FusedLinearKDLoss(num_chunks=chunks)(
                hidden, weight, labels, kd_ratio=0.5,
                teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
            ).loss  # fmt: skip
        else:
            chunks = int(mode.split("_")[1])

            def project(h, w, chunks=chunks):
                return [(c.reshape(-1, D) @ w.t()).view(B, -1, V) for c in h.chunk(chunks, 1)]

            student = project(hidden, weight)
            with torch.no_grad():
                teacher = project(teacher_hidden, teacher_weight)
            kd = ForwardKLWithChunkedOutputLoss(num_output_chunks=chunks)(student, teacher, labels)
            ce = CEWithChunkedOutputLoss(num_output_chunks=chunks)(student, labels)
            loss = 0.5 * kd + 0.5 * ce
        loss.backward()
        hidden.grad = weight.grad = None
        del loss
    return {
        "peak_rss_above_inputs_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)
        / 1024,
        "seconds_per_call": (time.perf_counter() - started) / calls,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # the worker
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.mode:
        print(json.dumps(measure(args.mode)))
        return 0
    rows = {}
    for mode in MODES:
        load = os.getloadavg()[0]
        out = subprocess.run(
            [sys.executable, __file__, "--mode", mode], capture_output=True, text=True, check=True
        ).stdout
        rows[mode] = {**json.loads(out.strip().splitlines()[-1]), "load_before": load}
        print(f"{mode}: {rows[mode]}", flush=True)
    if args.out is not None:
        payload = {
            "command": " ".join([sys.executable, *sys.argv]),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "shape": {"batch": B, "seq": S, "hidden": D, "vocab": V, "dtype": "bf16"},
            "results": rows,
        }
        args.out.write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
