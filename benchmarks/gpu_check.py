"""GPU readiness in one call: the loss benchmark and tiny bf16 recipe runs on CUDA.

Everything goes under one folder (``--out``, default ``benchmarks/results/gpu_check``):

- ``gpu_losses.json`` / ``gpu_losses.log``: ``benchmarks/gpu_losses.py`` (correctness of the
  fused loss on the GPU, then memory and time of every loss variant);
- ``runs/<config>/``: ``kdtune run knowledge_distillation`` with the tiny configs
  (``tiny/full_chunked``, ``tiny/full_fused``, ``tiny/lora_chunked``), ``device=cuda
  dtype=bf16``, ``--steps`` steps each (``metrics.jsonl``, checkpoints, ``run.log``);
- ``runs/resume/``: the first config stopped after half its steps and resumed; its
  losses are compared with the uninterrupted run's (the config is deterministic);
- ``summary.json`` and ``summary.md``: each check's status, seconds, command and the figures.

Without CUDA it stops at once with a one-line error (exit 2), before any work.
``--dry-run`` does the same on the CPU with tiny shapes (what tests/test_gpu_check.py runs)::

    python benchmarks/gpu_check.py --out "$OUT/gpu_check"      # on a GPU machine (~5-8 min)
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CONFIGS = ("tiny/full_chunked", "tiny/full_fused", "tiny/lora_chunked")


def _run(name: str, command: list[str], log: Path, timeout: float) -> dict:
    """Run ``command``, its output to ``log``; the check's record."""
    started = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        try:
            proc = subprocess.run(
                command, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, check=False
            )
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    record = {
        "check": name,
        "ok": code == 0,
        "returncode": code,
        "seconds": round(time.perf_counter() - started, 1),
        "command": shlex.join(command),
        "log": str(log),
    }
    if code != 0:
        record["log_tail"] = log.read_text()[-2000:]
    print(f"{'ok  ' if record['ok'] else 'FAIL'} {name} ({record['seconds']} s)", flush=True)
    return record


def _kdtune(config: str, assets: Path, output_dir: Path, device: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "kdtune.cli.main",
        "run",
        "knowledge_distillation",
        "--config",
        config,
        f"assets_dir={assets}",
        f"output_dir={output_dir}",
        f"device={device}",
        "dtype=bf16",
        *extra,
    ]


def _losses(output_dir: Path) -> list[float]:
    path = output_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["loss"] for r in records if r.get("kind") == "train"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu_check")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per recipe run")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes (CI smoke)")
    parser.add_argument("--skip-losses", action="store_true", help="no gpu_losses.py")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per check")
    parser.add_argument(
        "--configs",
        nargs="+",
        default=list(CONFIGS),
        help="tiny configs to run (the first one also gets the resume check)",
    )
    args = parser.parse_args(argv)

    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print(
            f"gpu_check: no CUDA device (torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda}): run it on a GPU machine, or pass --dry-run for the CPU "
            "smoke run",
            file=sys.stderr,
        )
        return 2
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the resume check stops half-way)")
    device = "cpu" if args.dry_run else "cuda"
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    from kdtune.assets import make_tiny_assets

    assets = make_tiny_assets(out / "assets", vocab="small", seed=0).root
    records = []
    if not args.skip_losses:
        command = [
            sys.executable,
            str(HERE / "gpu_losses.py"),
            "--out",
            str(out / "gpu_losses.json"),
        ]
        if args.dry_run:
            command.append("--dry-run")
        records.append(_run("gpu_losses", command, out / "gpu_losses.log", args.timeout))

    steps = [f"max_steps_per_epoch={args.steps}", "epochs=1"]
    for config in args.configs:
        run_dir = out / "runs" / config.replace("/", "_")
        command = _kdtune(config, assets, run_dir, device, *steps)
        record = _run(
            f"recipe {config}", command, out / "runs" / f"{run_dir.name}.log", args.timeout
        )
        record["losses"] = _losses(run_dir)
        records.append(record)

    straight = out / "runs" / args.configs[0].replace("/", "_")
    resumed = out / "runs" / "resume"
    half = f"stop_after_steps={args.steps // 2}"
    first = _kdtune(args.configs[0], assets, resumed, device, *steps, half)
    second = _kdtune(
        args.configs[0], assets, resumed, device, *steps, "resume_from_checkpoint=true"
    )
    a = _run("resume: first half", first, out / "runs" / "resume_1.log", args.timeout)
    b = _run("resume: the rest", second, out / "runs" / "resume_2.log", args.timeout)
    expected, got = _losses(straight), _losses(resumed)
    same = bool(expected) and expected == got
    records.append(
        {
            "check": "resume equals the uninterrupted run",
            "ok": a["ok"] and b["ok"] and same,
            "losses_straight": expected,
            "losses_resumed": got,
            "commands": [a["command"], b["command"]],
        }
    )
    print(f"{'ok  ' if records[-1]['ok'] else 'FAIL'} resume equals the uninterrupted run")

    summary = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (dry run)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dry_run": args.dry_run,
        "command": shlex.join([sys.executable, *sys.argv]),
        "ok": all(r["ok"] for r in records),
        "checks": records,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = [f"# gpu_check on {summary['device']} (torch {summary['torch']})", ""]
    lines += ["| check | ok | seconds | last loss |", "|---|---|---:|---:|"]
    for r in records:
        losses = r.get("losses") or r.get("losses_resumed") or []
        last = f"{losses[-1]:.4f}" if losses else "-"
        lines.append(
            f"| {r['check']} | {'yes' if r['ok'] else 'NO'} | {r.get('seconds', '-')} | {last} |"
        )
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print(
        f"{'all checks passed' if summary['ok'] else 'SOME CHECKS FAILED'}: {out / 'summary.json'}"
    )
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
