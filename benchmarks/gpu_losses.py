"""GPU benchmark of the KD loss variants: CUDA peak memory and CUDA-event times.

The same variants as ``bench_losses.py`` (see ``variants.py``), in one process: before each
case the caches are emptied and the peak counter is reset once the inputs exist, so the peak is
``max_memory_allocated() - memory_allocated()`` over the timed passes. Time is the median of
CUDA-event-timed passes after a warm-up. A correctness check of the fused loss against the plain
full-logits reference runs first, on the GPU, in fp32 and bf16 (it exercises the CUDA-only
``out_dtype`` matmul paths). Cases whose estimate exceeds 80% of the GPU's memory are skipped.
Designed to finish in under 5 minutes on one H100:

    python benchmarks/gpu_losses.py --out "$OUT/gpu_losses.json"
    python benchmarks/gpu_losses.py --dry-run          # tiny shapes on CPU: does it run at all

Works from a plain checkout (kdtune need not be installed: the repository root is registered as
the ``kdtune`` package). torchtune and liger-kernel are optional; missing ones are reported as
unavailable.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))


def _ensure_kdtune_importable() -> None:
    """Register the repository root as ``kdtune`` when the package is not installed."""
    if importlib.util.find_spec("kdtune") is not None:
        return
    spec = importlib.util.spec_from_file_location(
        "kdtune", REPO / "__init__.py", submodule_search_locations=[str(REPO)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["kdtune"] = module
    spec.loader.exec_module(module)


_ensure_kdtune_importable()

from bench_losses import (  # noqa: E402
    Case,
    cases_from_args,
    estimate_gib,
    format_table,
    versions,
)
from variants import STEPS, VARIANTS, make_inputs  # noqa: E402


def unavailable_reason(variant: str) -> str | None:
    needs = {
        "torchtune_chunked": "torchtune",
        "liger": "liger_kernel",
        "full": "pytest",  # the reference lives in tests/test_fused.py
    }
    package = needs.get(variant)
    if package is not None and importlib.util.find_spec(package) is None:
        return f"{package} not importable here"
    return None


def check_fused_against_reference(device: str) -> list[dict]:
    """Fused loss vs full-logits reference (values and grads) on ``device``."""
    from variants import load_test_reference

    from kdtune.losses.fused import FusedLinearKDLoss

    reference_losses = load_test_reference()
    results = []
    for dtype, tolerance in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        inputs = make_inputs(256, 1000, 64, 48, dtype, True, device=device)
        out = FusedLinearKDLoss("jsd", {"beta": 0.5}, chunk_size=100)(
            inputs.student_hidden,
            inputs.student_weight,
            inputs.labels,
            kd_ratio=0.5,
            teacher_hidden=inputs.teacher_hidden,
            teacher_weight=inputs.teacher_weight,
        )
        out.loss.backward()
        fused_grads = [inputs.student_hidden.grad.float(), inputs.student_weight.grad.float()]
        inputs.clear_grads()
        # The reference in fp32 from the same (upcast) inputs.
        hidden = inputs.student_hidden.detach().float().requires_grad_()
        weight = inputs.student_weight.detach().float().requires_grad_()
        student = torch.nn.functional.linear(hidden, weight)
        teacher = torch.nn.functional.linear(
            inputs.teacher_hidden.float(), inputs.teacher_weight.float()
        )
        loss, _, _ = reference_losses(
            student, teacher, inputs.labels, divergence="jsd", params={"beta": 0.5}
        )
        loss.backward()
        errors = [
            ((a - b.grad).abs().max() / b.grad.abs().max()).item()
            for a, b in zip(fused_grads, (hidden, weight))
        ]
        loss_error = abs(out.loss.item() - loss.item()) / abs(loss.item())
        results.append(
            {
                "dtype": str(dtype),
                "loss_rel_error": loss_error,
                "grad_hidden_rel_error": errors[0],
                "grad_weight_rel_error": errors[1],
                "ok": max(loss_error, *errors) < tolerance,
            }
        )
    return results


def measure(case: Case, device: str) -> dict:
    inputs = make_inputs(
        case.seq,
        case.vocab,
        case.hidden,
        case.teacher_hidden,
        getattr(torch, case.dtype),
        case.trainable,
        device=device,
    )
    step = STEPS[case.variant](inputs, case.rows)
    cuda = device == "cuda"
    for _ in range(case.warmup):
        step()
        inputs.clear_grads()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    times = []
    for _ in range(case.repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            begin = time.perf_counter()
            loss = step()
            times.append(time.perf_counter() - begin)
        inputs.clear_grads()
    peak = (torch.cuda.max_memory_allocated() - baseline) / 2**30 if cuda else math.nan
    del inputs, step
    return {"peak_gib": peak, "time_s": statistics.median(times), "loss": float(loss)}


def run_case(case: Case, device: str, cap_gib: float) -> dict:
    reason = unavailable_reason(case.variant)
    estimate = estimate_gib(case)
    row = {**asdict(case), "estimate_gib": estimate}
    if reason is not None:
        return {**row, "status": "unavailable", "reason": reason}
    if estimate > cap_gib:
        return {**row, "status": "skipped"}
    try:
        return {**row, "status": "ok", **measure(case, device)}
    except torch.OutOfMemoryError:
        return {**row, "status": "failed", "reason": "out of memory"}
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[2048, 4096, 16384])
    parser.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--weight", nargs="+", default=["frozen", "trainable"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--vocab", type=int, default=128_256)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--teacher-hidden", type=int, default=2048)
    parser.add_argument("--chunk-size", type=int, default=1024, help="rows per fused chunk")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU")
    args = parser.parse_args()

    device = "cpu" if args.dry_run or not torch.cuda.is_available() else "cuda"
    if args.dry_run:
        args.seq, args.vocab, args.hidden, args.teacher_hidden = [64, 128], 512, 64, 48
        args.chunk_size, args.warmup, args.repeats = 32, 1, 1
    elif device != "cuda":
        raise SystemExit("No CUDA device: use --dry-run for the CPU smoke run.")
    cap_gib = (
        0.8 * torch.cuda.get_device_properties(0).total_memory / 2**30 if device == "cuda" else 4
    )

    began = time.perf_counter()
    check = check_fused_against_reference(device)
    print(json.dumps({"correctness": check}), flush=True)
    rows = []
    for case in cases_from_args(args):
        rows.append(run_case(case, device, cap_gib))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    table = format_table(rows)
    print(table)
    print(f"total {time.perf_counter() - began:.0f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        device_name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu (dry run)"
        report = {
            "device": device_name,
            "versions": {**versions(), "cuda": torch.version.cuda},
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "correctness": check,
            "results": rows,
            "table": table,
        }
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
