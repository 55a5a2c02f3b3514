"""torchao export of the real SmolLM2-135M-Instruct: file sizes, and converted vs fake-quantised.

The teacher folder stands in for a QAT student's checkpoint (no training: the point is the
conversion and the file): for each torchao quantiser a step-checkpoint-shaped folder is made in
``--scratch`` (``model/`` links the folder's files; ``manifest.json`` records the quantiser and
``dtype: bf16`` as a run's fingerprints would), ``kdtune export --format torchao`` converts and
saves it, and this prints the file's size against the same weights in bf16 and the largest
logit difference between the saved model (reloaded) and the fake-quantised model on 64 tokens.

Run (about a minute on 2 CPU cores)::

    .venv/bin/python benchmarks/torchao_export_real.py --folder kdtune_real/teacher \\
        --scratch /tmp/torchao_real --out benchmarks/results/torchao_export_real.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torchao

from kdtune.models.hf_llama import read_hf_state_dict
from kdtune.quantization.torchao_export import (
    export_torchao,
    load_torchao_export,
    prepared_student,
    torchao_quantizer,
)

QUANTIZERS = {
    "8da4w_g32": {
        "_component_": "torchtune.training.quantization.Int8DynActInt4WeightQATQuantizer",
        "groupsize": 32,
    },
    # inner_k_tiles 4: SmolLM2's width 576 is a multiple of 4 * 16, not of the default 8 * 16
    "4w_g32": {
        "_component_": "torchtune.training.quantization.Int4WeightOnlyQATQuantizer",
        "groupsize": 32,
        "inner_k_tiles": 4,
    },
}


def pseudo_checkpoint(folder: Path, target: Path, quantizer: dict) -> Path:
    """``target/{model/ -> folder's files, manifest.json}`` as a QAT run would save it."""
    model = target / "model"
    model.mkdir(parents=True, exist_ok=True)
    for path in folder.iterdir():
        if path.is_file() and not (model / path.name).exists():
            (model / path.name).symlink_to(path.resolve())
    fingerprints = {"config": {"quantizer": quantizer, "dtype": "bf16"}}
    (target / "manifest.json").write_text(json.dumps({"fingerprints": fingerprints}))
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("::")[0].strip())
    parser.add_argument("--folder", type=Path, default=Path("kdtune_real/teacher"))
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/torchao_real"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    tokens = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(0))
    weights = read_hf_state_dict(args.folder)
    config = json.loads((args.folder / "config.json").read_text())
    rows = {}
    for name, node in QUANTIZERS.items():
        checkpoint = pseudo_checkpoint(args.folder, args.scratch / name, node)
        started = time.perf_counter()
        result = export_torchao(checkpoint)
        seconds = time.perf_counter() - started
        converted = load_torchao_export(checkpoint / "torchao")
        dtype = torch.bfloat16
        fake = prepared_student(config, torchao_quantizer(node), dtype, weights)
        with torch.no_grad():
            a, b = converted(tokens).float(), fake(tokens).float()
        rows[name] = {
            **{k: result.info[k] for k in ("precision", "size_bytes", "bf16_bytes")},
            "size_vs_bf16": round(result.size_bytes / result.bf16_bytes, 4),
            "export_seconds": round(seconds, 1),
            "max_abs_logit_diff_vs_fake_quant": float((a - b).abs().max()),
            "max_abs_logit": float(b.abs().max()),
            "top1_agreement_vs_fake_quant": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
        }
        print(name, json.dumps(rows[name]))
    result = {
        "command": "python benchmarks/torchao_export_real.py " + " ".join(sys.argv[1:]),
        "machine": platform.platform(),
        "versions": {"torch": torch.__version__, "torchao": torchao.__version__},
        "torch_threads": torch.get_num_threads(),
        "variants": rows,
    }
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
