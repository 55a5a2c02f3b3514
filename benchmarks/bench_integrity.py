"""What the integrity checks cost: SHA-256 per GB (teacher-cache shards on first use,
checkpoint files at save and resume), against cheaper hashes, and the fingerprints a resume
computes for a real config.

    python benchmarks/bench_integrity.py [--gib 1] [--config smollm2/135M_prune15_kd assets_dir=...]

The file is hashed from the page cache (written just before), as a shard or weights file just
written or read is; a cold read adds the disk's time to both sides.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from kdtune.training.checkpoint import fingerprints
from kdtune.training.config.loading import load_config, resolve_config


def _rate(seconds: float, nbytes: int) -> str:
    return f"{nbytes / seconds / 1e9:.2f} GB/s ({seconds * 1e9 / nbytes:.2f} s per GB)"


def hash_rates(gib: float) -> None:
    nbytes = int(gib * 2**30)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "blob"
        with path.open("wb") as file:
            for _ in range(nbytes // 2**24):
                file.write(os.urandom(2**24))
        nbytes = path.stat().st_size
        path.read_bytes()  # into the page cache
        fingerprints.release_cache()
        started = time.perf_counter()
        fingerprints.sha256_file(path)
        print(
            f"sha256 of a {nbytes / 2**30:.2f} GiB file: {_rate(time.perf_counter() - started, nbytes)}"
        )
        data = path.read_bytes()
    for name in ("blake2b", "sha1"):
        started = time.perf_counter()
        hashlib.new(name, data)
        print(f"{name} (in memory, for comparison): {_rate(time.perf_counter() - started, nbytes)}")
    try:
        import xxhash

        started = time.perf_counter()
        xxhash.xxh3_128(data)
        print(f"xxh3_128 (not cryptographic): {_rate(time.perf_counter() - started, nbytes)}")
    except ImportError:
        pass


def resume_fingerprints(config: str, overrides: list[str]) -> None:
    cfg = load_config(resolve_config(config), overrides)
    fingerprints.release_cache()
    started = time.perf_counter()
    fingerprints.record(cfg, is_lora=True)
    seconds = time.perf_counter() - started
    files = {Path(f) for f in _files(fingerprints.record(cfg, is_lora=True))}
    total = sum(f.stat().st_size for f in files)
    print(
        f"fingerprints of {config} (data, tokenizer, teacher and student base files, "
        f"{total / 1e6:.0f} MB in {len(files)} files): {seconds:.2f} s first, "
        f"then cached per process"
    )


def _files(value) -> list[str]:
    if isinstance(value, dict):
        if "sha256" in value and "file" in value:
            return [value["file"]]
        return [f for item in value.values() for f in _files(item)]
    if isinstance(value, list):
        return [f for item in value for f in _files(item)]
    return []


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--config", nargs="+", default=None, help="CONFIG [key=value ...]")
    args = parser.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"python {sys.version.split()[0]}, torch {torch.__version__}; "
        f"command: {' '.join(sys.argv)}"
    )
    hash_rates(args.gib)
    if args.config:
        resume_fingerprints(args.config[0], args.config[1:])


if __name__ == "__main__":
    main()
