"""Precision of a bf16 output weight's gradient: fp32 vs bf16 accumulation over chunks.

The error of each method's bf16 weight gradient against an fp64 evaluation of the same loss
on the same (bf16-valued) inputs: relative Frobenius error and max error / max |gradient|.
``bf16(fp64)`` is the fp64 gradient rounded to bf16 once: the least error any bf16 result has.

    python benchmarks/weight_grad_precision.py --seq 1024 --vocab 32768 --hidden 1024
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))


def errors(grad: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    diff = grad.double() - reference
    return {
        "rel_frobenius": float(diff.norm() / reference.norm()),
        "max_err_over_max": float(diff.abs().max() / reference.abs().max()),
    }


def fused_grad(inputs: dict, dtype: torch.dtype, rows: int, accumulation: str) -> torch.Tensor:
    from kdtune.losses import FusedLinearKDLoss

    weight = inputs["weight"].to(dtype, copy=True).requires_grad_()
    loss_fn = FusedLinearKDLoss(
        "forward_kl", chunk_size=rows, weight_grad_accumulation=accumulation
    )
    out = loss_fn(
        inputs["hidden"].to(dtype),
        weight,
        inputs["labels"],
        kd_ratio=0.5,
        teacher_hidden=inputs["teacher_hidden"].to(dtype),
        teacher_weight=inputs["teacher_weight"].to(dtype),
    )
    out.loss.backward()
    return weight.grad


def torchtune_chunked_grad(inputs: dict, chunks: int) -> torch.Tensor:
    """Autograd over torchtune's chunked bf16 head: per-chunk bf16 grads summed in bf16."""
    from torchtune.modules.loss import CEWithChunkedOutputLoss, ForwardKLWithChunkedOutputLoss

    weight = inputs["weight"].detach().clone().requires_grad_()
    student = [F.linear(h, weight) for h in inputs["hidden"].chunk(chunks, dim=1)]
    teacher = [
        F.linear(h, inputs["teacher_weight"]) for h in inputs["teacher_hidden"].chunk(chunks, 1)
    ]
    ce = CEWithChunkedOutputLoss(chunks)(student, inputs["labels"])
    kd = ForwardKLWithChunkedOutputLoss(chunks)(student, teacher, inputs["labels"])
    (0.5 * ce + 0.5 * kd).backward()
    return weight.grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--rows", type=int, nargs="+", default=[128, 32])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from variants import make_inputs

    made = make_inputs(args.seq, args.vocab, args.hidden, args.hidden, torch.bfloat16, True)
    inputs = {
        "hidden": made.student_hidden.detach(),
        "weight": made.student_weight.detach(),
        "teacher_hidden": made.teacher_hidden,
        "teacher_weight": made.teacher_weight,
        "labels": made.labels,
    }
    reference = fused_grad(inputs, torch.float64, args.seq, "fp32")
    rows_out = {"bf16(fp64)": errors(reference.to(torch.bfloat16), reference)}
    for rows in args.rows:
        chunks = -(-args.seq // rows)
        rows_out[f"kdtune fp32 accumulation, {chunks} chunks"] = errors(
            fused_grad(inputs, torch.bfloat16, rows, "fp32"), reference
        )
        rows_out[f"kdtune input_dtype (bf16) accumulation, {chunks} chunks"] = errors(
            fused_grad(inputs, torch.bfloat16, rows, "input_dtype"), reference
        )
        rows_out[f"torchtune chunked head (autograd, bf16 sum), {chunks} chunks"] = errors(
            torchtune_chunked_grad(inputs, chunks), reference
        )
    width = max(map(len, rows_out))
    lines = [f"S={args.seq} V={args.vocab} D={args.hidden} bf16, forward KL + CE (kd_ratio 0.5)"]
    lines += [f"{'method':<{width}}  rel. Frobenius  max err / max |g|"]
    for name, e in rows_out.items():
        lines.append(f"{name:<{width}}  {e['rel_frobenius']:14.2e}  {e['max_err_over_max']:17.2e}")
    print("\n".join(lines))
    if args.out:
        args.out.write_text(
            json.dumps({"args": vars(args) | {"out": str(args.out)}, "errors": rows_out}, indent=1)
        )
        args.out.with_suffix(".txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
