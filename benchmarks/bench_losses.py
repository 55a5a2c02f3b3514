"""CPU benchmark of the KD loss variants: peak extra memory and forward+backward time.

Every (variant, S, dtype, weight) runs in a fresh process (``--worker``), so one variant's
allocator state cannot flatter another's. In the worker, once the inputs exist and after the
warm-up passes, ``5`` is written to ``/proc/self/clear_refs`` (resetting the resident-set
high-water mark) and ``VmHWM - VmRSS`` after the timed passes is the peak extra memory. The
workers run with ``MALLOC_MMAP_THRESHOLD_`` low, so freed blocks leave the resident set and the
high-water mark is a true peak. Time is the median of the timed passes.

Before launching, each variant's peak is estimated (see ``estimate_gib``); anything above
``--cap-gib`` is reported as skipped with its estimate, so the benchmark never exhausts the
machine. The table is printed and written, with machine, versions and command, as JSON.

    python benchmarks/bench_losses.py --quick
    python benchmarks/bench_losses.py --seq 2048 4096 --dtype bfloat16 float32 \\
        --out benchmarks/results/cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


@dataclass(frozen=True)
class Case:
    variant: str
    seq: int
    dtype: str
    trainable: bool
    vocab: int
    hidden: int
    teacher_hidden: int
    rows: int  # rows per chunk of the fused loss (and the floor)
    warmup: int
    repeats: int


# ------------------------------------------------------------------------------------------------
# Worker (one case per process)


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} missing from /proc/self/status")


def cases_from_args(args: argparse.Namespace) -> Iterator[Case]:
    """Every (S, dtype, weight, variant) case the command line asks for, in that loop order."""
    for seq in args.seq:
        for dtype in args.dtype:
            for weight in args.weight:
                for variant in args.variants:
                    yield Case(
                        variant=variant,
                        seq=seq,
                        dtype=dtype,
                        trainable=weight == "trainable",
                        vocab=args.vocab,
                        hidden=args.hidden,
                        teacher_hidden=args.teacher_hidden,
                        rows=args.chunk_size,
                        warmup=args.warmup,
                        repeats=args.repeats,
                    )


def run_worker(case: Case) -> dict:
    import torch
    from variants import STEPS, make_inputs

    inputs = make_inputs(
        case.seq,
        case.vocab,
        case.hidden,
        case.teacher_hidden,
        getattr(torch, case.dtype),
        case.trainable,
    )
    step = STEPS[case.variant](inputs, case.rows)
    for _ in range(case.warmup):
        step()
        inputs.clear_grads()
    baseline = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    times = []
    for _ in range(case.repeats):
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
        inputs.clear_grads()
    peak = _status_bytes("VmHWM") - baseline
    return {
        "peak_gib": peak / 2**30,
        "time_s": statistics.median(times),
        "times_s": times,
        "loss": float(loss),
        "threads": torch.get_num_threads(),
    }


def run_interleaved_worker(spec: dict) -> dict:
    """Time several variants on the same inputs in rounds (A B C A B C ...), one process.

    On a shared machine the load drifts over minutes; alternating the variants exposes each to
    the same drift, so their time ratios are more trustworthy than those of separate processes.
    ``warmup`` untimed rounds come first; wall and process CPU time are both recorded.
    No memory is measured here (the variants' allocations would mix).
    """
    import torch
    from variants import STEPS, make_inputs

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    inputs = make_inputs(
        spec["seq"],
        spec["vocab"],
        spec["hidden"],
        spec["teacher_hidden"],
        getattr(torch, spec["dtype"]),
        spec["trainable"],
    )
    steps = {variant: STEPS[variant](inputs, spec["rows"]) for variant in spec["variants"]}
    times: dict[str, list[float]] = {variant: [] for variant in steps}
    cpu: dict[str, list[float]] = {variant: [] for variant in steps}
    for _ in range(spec.get("warmup", 0)):  # first touch of every buffer: not timed
        for step in steps.values():
            step()
            inputs.clear_grads()
    for _ in range(spec["rounds"]):
        for variant, step in steps.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            step()
            times[variant].append(time.perf_counter() - start)
            cpu[variant].append(time.process_time() - start_cpu)
            inputs.clear_grads()
    return {
        variant: {
            "time_s": statistics.median(t),
            "times_s": t,
            "cpu_s": statistics.median(cpu[variant]),
            "cpus_s": cpu[variant],
        }
        for variant, t in times.items()
    }


# ------------------------------------------------------------------------------------------------
# Memory estimate (to skip what would not fit), calibrated on this machine at S=2048


def estimate_gib(case: Case) -> float:
    """A deliberately generous estimate of a case's peak extra memory, in GiB.

    ``N*V`` terms are the logits-sized tensors each variant keeps; the weight term is the
    weight gradient (fp32 accumulator plus the cast for the fused loss on bf16).
    """
    b = DTYPE_BYTES[case.dtype]
    logits = case.seq * case.vocab
    weight = case.vocab * case.hidden
    chunk = min(case.rows or 261, case.seq) * case.vocab
    weight_grad = weight * (b + 4 if case.dtype != "float32" else 4) if case.trainable else 0
    per_variant = {
        "full": logits * (2 * b + 32),
        "torchtune_chunked": logits * (2 * b + 12),
        "kdtune_chunked": logits * (3 * b + 4) + 10 * 1024 * case.vocab,
        "kdtune_fused": 12 * chunk * 4,
        "kdtune_fused_lowp": 12 * chunk * 4,  # the same chunks; only the weight-grad sum differs
        "kdtune_topk": 12 * chunk * 4 + 2 * 1024 * case.vocab * 4,
        "liger": 12 * 1024 * case.vocab * 4 + weight * b,
        "floor": 3 * chunk * b,
    }[case.variant]
    return (per_variant + weight_grad) / 2**30 * 1.25


# ------------------------------------------------------------------------------------------------
# Driver


def machine_info() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem_kib = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal")
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(mem_kib / 2**20, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("torch", "torchtune", "liger-kernel", "kdtune"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def launch(case: Case, timeout: float) -> dict:
    from variants import unavailable_reason

    reason = unavailable_reason(case.variant)
    if reason is not None:
        return {"status": "unavailable", "reason": reason}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(asdict(case))]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "reason": f"over {timeout:.0f} s"}
    if done.returncode != 0:
        return {"status": "failed", "reason": done.stderr.strip().splitlines()[-1:]}
    return {"status": "ok", **json.loads(done.stdout.strip().splitlines()[-1])}


def format_table(rows: list[dict]) -> str:
    header = (
        f"{'S':>6} {'dtype':>9} {'weight':>9} {'variant':>18} {'peak GiB':>9} {'time s':>8} "
        f"{'mem/tt':>7} {'time/tt':>8} {'time/floor':>10}  note"
    )
    lines = [header, "-" * len(header)]
    key = lambda r: (r["seq"], r["dtype"], r["trainable"])  # noqa: E731
    for row in rows:
        group = [r for r in rows if key(r) == key(row)]
        baseline = next((r for r in group if r["variant"] == "torchtune_chunked"), None)
        floor = next((r for r in group if r["variant"] == "floor"), None)

        def ratio(metric: str, other: dict | None, row: dict = row) -> str:
            if row["status"] != "ok" or other is None or other["status"] != "ok":
                return "-"
            return f"{row[metric] / other[metric]:.2f}"

        ok = row["status"] == "ok"
        note = "" if ok else f"{row['status']}: {row.get('reason', '')}"
        if row["status"] == "skipped":
            note = f"skipped: estimate {row['estimate_gib']:.1f} GiB > cap"
        lines.append(
            f"{row['seq']:>6} {row['dtype']:>9} {'trainable' if row['trainable'] else 'frozen':>9} "
            f"{row['variant']:>18} {row['peak_gib'] if ok else float('nan'):>9.2f} "
            f"{row['time_s'] if ok else float('nan'):>8.1f} {ratio('peak_gib', baseline):>7} "
            f"{ratio('time_s', baseline):>8} {ratio('time_s', floor):>10}  {note}"
        )
    return "\n".join(lines)


def run_interleaved(args: argparse.Namespace) -> None:
    """Launch one interleaved-timing worker and print (and append to --out) its times."""
    from variants import unavailable_reason

    variants = [v for v in args.variants if unavailable_reason(v) is None]
    spec = {
        "variants": variants,
        "seq": args.seq[0],
        "dtype": args.dtype[0],
        "trainable": args.weight[0] == "trainable",
        "vocab": args.vocab,
        "hidden": args.hidden,
        "teacher_hidden": args.teacher_hidden,
        "rows": args.chunk_size,
        "rounds": args.interleave,
        "threads": args.threads,
        "warmup": args.warmup,
        "loadavg_before": Path("/proc/loadavg").read_text().split()[:3],
    }
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, str(Path(__file__).resolve()), "--interleaved-worker"]
    done = subprocess.run(
        [*command, json.dumps(spec)], capture_output=True, text=True, timeout=args.timeout, env=env
    )
    if done.returncode != 0:
        raise SystemExit(done.stderr)
    times = json.loads(done.stdout.strip().splitlines()[-1])
    spec["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
    lines = [
        f"interleaved timing, S={spec['seq']} {spec['dtype']} {args.weight[0]}, "
        f"{args.interleave} rounds (median s), threads {args.threads or 'default'}, "
        f"load {' '.join(spec['loadavg_before'])} -> {' '.join(spec['loadavg_after'])}"
    ]
    for metric, label in (("time_s", "wall"), ("cpu_s", "cpu")):
        reference = times.get("torchtune_chunked", {}).get(metric)
        floor = times.get("floor", {}).get(metric)
        liger = times.get("liger", {}).get(metric)
        for variant, result in times.items():
            ratios = [
                f"{name} {result[metric] / base:5.2f}" if base else f"{name}     -"
                for name, base in (("/tt", reference), ("/floor", floor), ("/liger", liger))
            ]
            lines.append(f"{label:>4} {variant:>18} {result[metric]:8.2f}  " + "  ".join(ratios))
    print("\n".join(lines))
    if args.out:
        with args.out.with_suffix(".txt").open("a") as f:
            f.write("\n" + "\n".join(lines) + "\n")
        report = json.loads(args.out.read_text()) if args.out.exists() else {}
        report.setdefault("interleaved", []).append({**spec, "times": times})
        report.setdefault("commands", []).append(" ".join([Path(sys.executable).name, *sys.argv]))
        args.out.write_text(json.dumps(report, indent=1))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from variants import VARIANTS

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--interleaved-worker", help=argparse.SUPPRESS)
    parser.add_argument(
        "--interleave",
        type=int,
        metavar="ROUNDS",
        help="instead of the table: time the variants in one process, alternating, ROUNDS "
        "times each, at the first --seq/--dtype/--weight (times only)",
    )
    parser.add_argument("--seq", type=int, nargs="+", default=[2048, 4096, 16384])
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument(
        "--weight", nargs="+", default=["frozen", "trainable"], choices=["frozen", "trainable"]
    )
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument(
        "--only-long",
        nargs="*",
        default=["kdtune_fused", "floor"],
        help="variants run at S > --long-from (others are reported as not run)",
    )
    parser.add_argument("--long-from", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=128_256)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--teacher-hidden", type=int, default=2048)
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=0,
        help="rows per fused chunk (and floor); 0: the fused loss's default (memory budget)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads in the interleaved worker (0: torch's default). With 1, the process "
        "CPU time (the 'cpu' rows) is the work done, little affected by other load",
    )
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cap-gib", type=float, default=16.0, help="skip estimates above")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per case")
    parser.add_argument("--out", type=Path, help="write the JSON results here (and a .txt table)")
    parser.add_argument(
        "--append",
        action="store_true",
        help="add to the results already in --out (one table for several invocations)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="S=256, V=32,768, bf16, all variants (a smoke run)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.seq, args.vocab, args.dtype, args.repeats = [256], 32_768, ["bfloat16"], 2
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(Case(**json.loads(args.worker)))))
        return
    if args.interleaved_worker:
        print(json.dumps(run_interleaved_worker(json.loads(args.interleaved_worker))))
        return
    if args.interleave:
        run_interleaved(args)
        return
    previous = json.loads(args.out.read_text()) if args.append and args.out.exists() else {}
    rows = list(previous.get("results", []))
    commands = [*previous.get("commands", []), " ".join([Path(sys.executable).name, *sys.argv])]
    for case in cases_from_args(args):
        estimate = estimate_gib(case)
        if case.seq > args.long_from and case.variant not in args.only_long:
            result = {"status": "not run", "reason": f"only {args.only_long} at S>"}
        elif estimate > args.cap_gib:
            result = {"status": "skipped"}
        else:
            result = launch(case, args.timeout)
        row = {**asdict(case), "estimate_gib": estimate, **result}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    table = format_table(rows)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "machine": machine_info(),
            "versions": versions(),
            "commands": commands,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "results": rows,
            "table": table,
        }
        args.out.write_text(json.dumps(report, indent=1))
        args.out.with_suffix(".txt").write_text(table + "\n")


if __name__ == "__main__":
    main()
