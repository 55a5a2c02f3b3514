"""GGUF export of the real SmolLM2-135M-Instruct folder: file sizes, and the read-back logits.

For each ``--quant`` (and the ``--embedding-quant`` variants), ``kdtune export`` writes the GGUF;
this prints its size against the bf16 folder (the same weights saved as bf16 safetensors plus the
folder's tokenizer/config files, written to a scratch folder and measured), and compares, on a
few tokens of a chat, the logits of:

* ``gguf``: Hugging Face transformers' GGUF loader on the exported file (dequantised, fp32);
* ``kdtune``: kdtune's forward (the torchtune decoder of the HF folder, fp32) with every 2-D
  weight fake-quantised as the file stores it (``kdtune.quantization.gguf_fake_quant``);
* ``hf_fq``: transformers' forward on the HF folder with the same fake-quantised weights
  (to separate the reader from the two model implementations);
* ``fp32``: kdtune's forward without quantisation (the quantisation error, for scale).

Run (about a minute per variant on 2 CPU cores)::

    .venv/bin/python benchmarks/gguf_export_real.py --folder kdtune_real/teacher \\
        --out benchmarks/results/gguf_export_real.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torchtune.data import Message

from kdtune.models.hf_llama import load_hf_folder, read_hf_state_dict
from kdtune.quantization.gguf_export import export_gguf
from kdtune.quantization.gguf_fake_quant import gguf_fake_quantize
from kdtune.smollm2.tokenizer import SmolLM2Tokenizer

VARIANTS = [("f16", None), ("q8_0", None), ("q4_0", None), ("q4_0", "q4_0")]
EMBEDDING = ("tok_embeddings.weight", "output.weight")


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def bf16_folder_bytes(folder: Path, scratch: Path) -> int:
    """The folder with its weights saved as bf16 (the size a bf16 checkpoint folder has)."""
    target = scratch / "bf16"
    target.mkdir()
    for path in folder.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and not path.name.startswith("kdtune"):
            shutil.copy(path, target / path.name)
    weights = {k: v.to(torch.bfloat16).contiguous() for k, v in read_hf_state_dict(folder).items()}
    save_file(weights, str(target / "model.safetensors"), metadata={"format": "pt"})
    return folder_bytes(target)


def fake_quantise(model: torch.nn.Module, quant: str, embedding_quant: str, embedding_names):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() != 2:
                continue
            qtype = embedding_quant if name in embedding_names else quant
            if qtype == "f16":
                param.copy_(param.half().float())
            else:
                param.copy_(gguf_fake_quantize(param, qtype, name))
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folder", type=Path, default=Path("kdtune_real/teacher"))
    parser.add_argument("--out", type=Path, default=None, help="JSON results")
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, GgufConfig

    torch.manual_seed(0)
    tokenizer = SmolLM2Tokenizer(args.folder)
    tokens, _ = tokenizer.tokenize_messages(
        [Message("user", "What is the capital of France? Answer in 3 words.")]
    )
    batch = torch.tensor([tokens])
    rows = []
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        bf16_bytes = bf16_folder_bytes(args.folder, scratch)
        with torch.no_grad():
            fp32 = load_hf_folder(args.folder)(batch)[0]
        for quant, embedding_quant in VARIANTS:
            start = time.perf_counter()
            result = export_gguf(
                args.folder,
                scratch / f"m-{quant}.gguf",
                quant=quant,
                embedding_quant=embedding_quant,
            )
            export_s = time.perf_counter() - start
            embedding = embedding_quant or ("q8_0" if quant == "q4_0" else quant)
            gguf_model = AutoModelForCausalLM.from_pretrained(
                str(scratch),
                gguf_file=result.path.name,
                dtype=torch.float32,
                quantization_config=GgufConfig(dequantize=True),
            )
            hf_model = AutoModelForCausalLM.from_pretrained(str(args.folder), dtype=torch.float32)
            hf_embedding = ("model.embed_tokens.weight", "lm_head.weight")
            fake_quantise(hf_model, quant, embedding, hf_embedding)
            kdtune = fake_quantise(load_hf_folder(args.folder), quant, embedding, EMBEDDING)
            with torch.no_grad():
                gguf_logits = gguf_model(batch).logits[0]
                hf_fq = hf_model(batch).logits[0]
                ours = kdtune(batch)[0]
            row = {
                "quant": quant,
                "embedding_quant": embedding,
                "gguf_bytes": result.size_bytes,
                "ratio_to_bf16_folder": round(result.size_bytes / bf16_bytes, 4),
                "export_s": round(export_s, 1),
                "max_abs_gguf_vs_kdtune_fq": float((gguf_logits - ours).abs().max()),
                "max_abs_gguf_vs_hf_fq": float((gguf_logits - hf_fq).abs().max()),
                "max_abs_fq_vs_fp32": float((ours - fp32).abs().max()),
                "argmax_agree_gguf_vs_kdtune_fq": float(
                    (gguf_logits.argmax(-1) == ours.argmax(-1)).float().mean()
                ),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            result.path.unlink()
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "folder": str(args.folder),
        "folder_bytes_as_stored": folder_bytes(args.folder),
        "bf16_folder_bytes": bf16_bytes,
        "tokens": len(tokens),
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
        "versions": {
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "gguf": __import__("importlib.metadata").metadata.version("gguf"),
        },
        "rows": rows,
    }
    print(f"bf16 folder: {bf16_bytes / 2**20:.1f} MiB")
    for row in rows:
        print(
            f"{row['quant']:>5} (embedding {row['embedding_quant']}): "
            f"{row['gguf_bytes'] / 2**20:6.1f} MiB = {row['ratio_to_bf16_folder']:.3f}x bf16; "
            f"max|gguf - kdtune fq| {row['max_abs_gguf_vs_kdtune_fq']:.2e}, "
            f"max|gguf - hf fq| {row['max_abs_gguf_vs_hf_fq']:.2e}, "
            f"max|fq - fp32| {row['max_abs_fq_vs_fp32']:.2f}"
        )
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
