"""llama.cpp runs what kdtune trained: its logits for an exported GGUF against kdtune's
fake-quantised forward (issue 24's optional check; a benchmark, never CI).

Needs ``llama_cpp`` (llama-cpp-python built here from its source package: under an hour on 2
busy cores; nothing is downloaded at run time; it also wants ``diskcache``)::

    pip download --no-deps --no-binary :all: llama-cpp-python -d /tmp/llamacpp
    CMAKE_ARGS="-DLLAMA_CURL=OFF" pip install --no-deps /tmp/llamacpp/llama_cpp_python-*.tar.gz
    pip install diskcache

For a model folder (a checkpoint's ``model/``, a QAD arm's, or ``kdtune_real/teacher``) and each
``--quant``:

1. ``kdtune export --format gguf --quant Q`` writes the GGUF;
2. llama.cpp (``llama_cpp.Llama(logits_all=True)``) scores held-out token sequences: logits
   ``[S, V]``;
3. kdtune scores the same tokens with the folder's torchtune decoder in fp32, once fake-quantised
   by :class:`kdtune.quantization.qat.GGUFQATQuantizer` (the forward QAT/QAD trains) and once
   unquantised (the yardstick: how far quantisation itself moves the logits);
4. per quant type: KL(llama.cpp || kdtune), top-1 agreement and the largest logit difference,
   against both kdtune forwards, and whether llama.cpp tokenises the texts and a ChatML chat as
   kdtune's tokenizer does.

llama.cpp is not bit-equal to an fp32 forward by design: before a Q4_0/Q8_0 matmul its CPU
kernels round the activations to 8-bit blocks (Q8_0), and they sum in another order. The check
shows that llama.cpp's logits sit far closer to the fake-quantised forward than to the
unquantised one, i.e. that it runs the weights kdtune trained; the residual is the size of that
activation rounding (a last row: kdtune's own forward with its projection inputs rounded to
Q8_0, against itself). Emulating the rounding in kdtune does not reproduce llama.cpp's to the
bit (its kernels differ in details), so the weights' bit-exactness rests on the transformers
reader of ``tests/test_gguf_export.py``; this check adds llama.cpp's own loader, tokenizer and
arithmetic.

::

    python benchmarks/llama_cpp_check.py --model ./kdtune_real/teacher --out results/llama_cpp

Output under ``--out``: ``metrics.jsonl`` (one line per quant type), ``results.md`` (the
table) and ``study.json`` (command, machine, load, versions); the GGUF files under ``--work``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

from kdtune.models.hf_llama import load_hf_folder
from kdtune.quantization.gguf_fake_quant import gguf_fake_quantize
from kdtune.quantization.qat import (
    GGUFFakeQuantLinear,
    GGUFFakeQuantTiedProjection,
    GGUFQATQuantizer,
)
from kdtune.smollm2.demo import kdtune_command, run_logged
from kdtune.smollm2.tokenizer import SmolLM2Tokenizer

LICENSES = Path("/usr/share/common-licenses")
TEXT_FILES = ("Apache-2.0", "GPL-3", "MPL-2.0", "Artistic")
"""Held-out English text present on every Debian machine (no download)."""
CHAT = [
    {"role": "user", "content": "Why is the sky blue? Answer in two sentences."},
    {"role": "assistant", "content": "Sunlight scatters off air molecules; blue scatters most."},
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("::")[0].strip())
    parser.add_argument("--model", type=Path, required=True, help="a Llama HF folder")
    parser.add_argument("--out", type=Path, required=True, help="results folder")
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="where the GGUF files go (kept for reruns; default: a folder under the system's "
        "temporary directory, so --out holds results only)",
    )
    parser.add_argument("--quants", nargs="+", default=["f16", "q8_0", "q4_0"])
    parser.add_argument(
        "--embedding-quant", default=None, help="export's --embedding-quant (default: its own)"
    )
    parser.add_argument("--sequences", type=int, default=8, help="held-out sequences scored")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    return parser.parse_args(argv)


def held_out_sequences(tokenizer: SmolLM2Tokenizer, count: int, length: int) -> list[list[int]]:
    """``count`` sequences of ``length`` token ids cut from Debian's licence texts, each
    starting with the tokenizer's BOS id."""
    text = "\n\n".join((LICENSES / name).read_text() for name in TEXT_FILES)
    ids = tokenizer.encode(text, add_bos=False, add_eos=False)
    body = length - 1
    if len(ids) < count * body:
        raise SystemExit(f"only {len(ids)} tokens of text; ask for fewer --sequences")
    return [[tokenizer.bos_id, *ids[i * body : (i + 1) * body]] for i in range(count)]


def llama_cpp_logits(gguf_file: Path, sequences: list[list[int]], threads: int) -> torch.Tensor:
    """llama.cpp's logits ``[N, S, V]`` fp32 for each sequence, evaluated from an empty cache."""
    from llama_cpp import Llama

    length = max(len(s) for s in sequences)
    llm = Llama(
        model_path=str(gguf_file),
        n_ctx=length,
        n_batch=length,
        logits_all=True,
        n_threads=threads,
        verbose=False,
    )
    out = []
    for tokens in sequences:
        llm.reset()
        llm.eval(tokens)
        out.append(torch.from_numpy(llm.scores[: len(tokens)].copy()))
    return torch.stack(out).float()


def kdtune_logits(
    folder: Path,
    sequences: list[list[int]],
    quant: str | None,
    embedding_quant: str | None,
    q8_0_activations: bool = False,
) -> torch.Tensor:
    """kdtune's fp32 logits ``[N, S, V]`` from ``folder``'s torchtune decoder: as stored
    (``quant`` None), with every 2-D weight rounded to fp16 (``f16``: what an f16 GGUF stores),
    or prepared by :class:`GGUFQATQuantizer` (``q8_0``/``q4_0``: the fake-quantised forward
    QAT trains; the embedding as ``embedding_quant``, ``f16`` for none).

    ``q8_0_activations``: also round the input rows of every fake-quantised projection to Q8_0
    blocks, as llama.cpp's CPU kernels do before a Q4_0/Q8_0 dot product (``vec_dot_type``
    Q8_0): an emulation of llama.cpp's arithmetic, not of training."""
    model = load_hf_folder(folder)
    with torch.no_grad():
        if quant == "f16":
            for param in model.parameters():
                if param.dim() == 2:
                    param.copy_(param.half().float())
        elif quant is not None:
            embedding = "none" if embedding_quant == "f16" else embedding_quant
            model = GGUFQATQuantizer(quant, embedding).prepare(model)
            if q8_0_activations:
                for module in model.modules():
                    if isinstance(module, GGUFFakeQuantLinear | GGUFFakeQuantTiedProjection):
                        module.register_forward_pre_hook(_q8_0_input)
        return model(torch.tensor(sequences)).float()


def _q8_0_input(module: torch.nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: the first input ``[..., in]`` rounded to Q8_0 blocks of 32."""
    x = args[0]
    return (gguf_fake_quantize(x.float(), "q8_0").to(x.dtype), *args[1:])


def compare(theirs: torch.Tensor, ours: torch.Tensor) -> dict[str, float]:
    """KL(theirs || ours) per token (mean, max), top-1 agreement and the largest |logit
    difference| between two ``[N, S, V]`` logit tensors."""
    log_p, log_q = theirs.log_softmax(-1), ours.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return {
        "kl_mean": kl.mean().item(),
        "kl_max": kl.max().item(),
        "top1_agreement": (theirs.argmax(-1) == ours.argmax(-1)).float().mean().item(),
        "max_abs_logit_diff": (theirs - ours).abs().max().item(),
    }


def tokenization_matches(gguf_file: Path, tokenizer: SmolLM2Tokenizer) -> dict[str, bool]:
    """Whether llama.cpp's tokenizer (read from the GGUF) gives kdtune's ids for each licence
    text's first 4,000 characters and for a chat rendered as ChatML text by kdtune's tokenizer
    (special tokens parsed by both)."""
    from llama_cpp import Llama
    from torchtune.data import Message

    llm = Llama(model_path=str(gguf_file), vocab_only=True, verbose=False)
    found = {}
    for name in TEXT_FILES:
        text = (LICENSES / name).read_text()[:4000]
        ours = tokenizer.encode(text, add_bos=False, add_eos=False)
        found[name] = llm.tokenize(text.encode(), add_bos=False, special=False) == ours
    messages = [Message(role=m["role"], content=m["content"]) for m in CHAT]
    rendered = tokenizer.decode(tokenizer.tokenize_messages(messages)[0])  # ChatML text
    ours = tokenizer.encode(rendered, add_bos=False, add_eos=False)
    found["chat"] = llm.tokenize(rendered.encode(), add_bos=False, special=True) == ours
    return found


def export(model: Path, quant: str, embedding_quant: str | None, out: Path) -> Path:
    """``kdtune export`` of ``model`` as ``quant``; the GGUF's path (kept if present)."""
    gguf_file = out / f"model-{quant}.gguf"
    if not gguf_file.is_file():
        extra = ["--embedding-quant", embedding_quant] if embedding_quant else []
        command = kdtune_command(
            "export", str(model), "--format", "gguf", "--quant", quant, "--out", str(gguf_file),
            *extra,
        )  # fmt: skip
        run_logged(command, out / f"export-{quant}.log", f"{quant} export")
    return gguf_file


AGAINST = {
    "fake_quantised": "kdtune fake-quantised (training's forward)",
    "fake_quantised_q8_0_activations": "kdtune fake-quantised, activations rounded to Q8_0",
    "unquantised": "kdtune unquantised weights",
    "q8_0_activation_rounding_alone": "(kdtune vs itself with activations rounded to Q8_0)",
}


def table(rows: list[dict]) -> str:
    lines = [
        "| GGUF | llama.cpp vs | KL mean | KL max | top-1 agreement | max abs logit diff |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        for against, label in AGAINST.items():
            s = row[against]
            if s is None:
                continue
            lines.append(
                f"| {row['quant']} | {label} | {s['kl_mean']:.2e} "
                f"| {s['kl_max']:.2e} | {s['top1_agreement']:.4f} | {s['max_abs_logit_diff']:.3f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.work is None:
        args.work = Path(tempfile.gettempdir()) / "kdtune_llama_cpp_check" / args.out.name
    args.work.mkdir(parents=True, exist_ok=True)
    tokenizer = SmolLM2Tokenizer(args.model)
    sequences = held_out_sequences(tokenizer, args.sequences, args.seq_len)
    unquantised = kdtune_logits(args.model, sequences, None, None)
    rows = []
    for quant in args.quants:
        gguf_file = export(args.model, quant, args.embedding_quant, args.work)
        theirs = llama_cpp_logits(gguf_file, sequences, args.threads)
        ours = kdtune_logits(args.model, sequences, quant, args.embedding_quant)
        emulated = None
        if quant != "f16":
            emulated = kdtune_logits(args.model, sequences, quant, args.embedding_quant, True)
        row = {
            "quant": quant,
            "gguf_bytes": gguf_file.stat().st_size,
            "fake_quantised": compare(theirs, ours),
            "unquantised": compare(theirs, unquantised),
            "fake_quantised_q8_0_activations": compare(theirs, emulated)
            if emulated is not None
            else None,
            # how far kdtune's own forward moves when its activations are rounded so
            "q8_0_activation_rounding_alone": compare(emulated, ours)
            if emulated is not None
            else None,
            "tokenization_matches": tokenization_matches(gguf_file, tokenizer),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    (args.out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokens_ok = all(all(r["tokenization_matches"].values()) for r in rows)
    (args.out / "results.md").write_text(
        f"{table(rows)}\n\n{len(sequences)} sequences x {args.seq_len} tokens of held-out text. "
        f"llama.cpp tokenises the texts and the chat as kdtune does: {tokens_ok}.\n"
    )
    from importlib.metadata import version

    study = {
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "load": os.getloadavg(),
        "versions": {"torch": torch.__version__, "llama_cpp_python": version("llama_cpp_python")},
        "model": str(args.model),
    }
    (args.out / "study.json").write_text(json.dumps(study, indent=2))
    print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
