"""Score SmolLM2 checkpoints on held-out text, and show their greedy chat answers.

For each model: held-out cross-entropy and perplexity, KL(teacher ‖ model) per token and top-1
agreement with the teacher, at every target position of the held-out records (tokenised by the
recipe config's own ``validation_dataset`` component, so the positions are those the recipe
validates on). Models are torchtune decoders in fp32, loaded from Hugging Face folders.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn
from torchtune import config
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, Message, padded_collate_sft
from torchtune.generation import generate
from torchtune.modules.common_utils import delete_kv_caches

from kdtune.demo.evaluate import load_hf_weights, resolve_checkpoint_dir
from kdtune.smollm2.models import smollm2_from_hf_config
from kdtune.smollm2.tokenizer import SmolLM2Tokenizer

CHAT_PROMPTS = (
    "What is the capital of France?",
    "What does the Python keyword 'yield' do?",
    "Give me one tip for writing clear code.",
)


def load_smollm2(folder: str | Path) -> nn.Module:
    """A SmolLM2-shaped HF folder (any layer count) or a recipe output_dir, in fp32, eval mode."""
    folder = resolve_checkpoint_dir(folder)
    model = smollm2_from_hf_config(json.loads((folder / "config.json").read_text()))
    model.load_state_dict({k: v.float() for k, v in load_hf_weights(folder).items()})
    return model.float().eval()


def held_out_batches(cfg: DictConfig, batch_size: int, max_records: int | None) -> list[dict]:
    """The config's validation records as ``{"tokens": [B, S], "labels": [B, S]}`` batches."""
    tokenizer = config.instantiate(cfg.tokenizer)
    dataset = config.instantiate(cfg.validation_dataset, tokenizer)
    count = len(dataset) if max_records is None else min(max_records, len(dataset))
    samples = [dataset[i] for i in range(count)]
    return [
        padded_collate_sft(
            samples[i : i + batch_size],
            padding_idx=tokenizer.pad_id,
            ignore_idx=CROSS_ENTROPY_IGNORE_IDX,
        )
        for i in range(0, count, batch_size)
    ]


@torch.no_grad()
def teacher_log_probs(teacher: nn.Module, batches: list[dict]) -> list[Tensor]:
    """Per batch, the teacher's next-token log-probabilities at the target positions ``[N, V]``
    (fp32: 16 records of 128 tokens take 0.4 GB)."""
    out = []
    for batch in batches:
        mask = _targets(batch)[1]
        out.append(F.log_softmax(teacher(batch["tokens"]).float(), -1)[mask])
    return out


def _targets(batch: dict) -> tuple[Tensor, Tensor]:
    """(next-token labels ``[B, S]``, bool mask of positions with a target ``[B, S]``)."""
    labels = torch.cat(
        [batch["labels"][:, 1:], torch.full_like(batch["labels"][:, :1], CROSS_ENTROPY_IGNORE_IDX)],
        dim=1,
    )
    return labels, labels != CROSS_ENTROPY_IGNORE_IDX


@dataclass(frozen=True)
class Scores:
    ce: float
    perplexity: float
    kl_to_teacher: float
    top1_agreement: float
    num_tokens: int


@torch.no_grad()
def score(model: nn.Module | None, batches: list[dict], teacher_lp: list[Tensor]) -> Scores:
    """Token means of CE, KL(teacher ‖ model) and argmax agreement over all target positions.

    ``model=None`` scores the teacher itself from ``teacher_lp`` (no second forward).
    """
    ce_sum = kl_sum = agree = 0.0
    count = 0
    for batch, t_lp in zip(batches, teacher_lp, strict=True):
        labels, mask = _targets(batch)
        s_lp = t_lp if model is None else F.log_softmax(model(batch["tokens"]).float(), -1)[mask]
        ce_sum += F.nll_loss(s_lp, labels[mask], reduction="sum").item()
        kl_sum += (t_lp.exp() * (t_lp - s_lp)).sum().item()
        agree += (s_lp.argmax(-1) == t_lp.argmax(-1)).sum().item()
        count += int(mask.sum())
    ce = ce_sum / count
    return Scores(ce, math.exp(ce), kl_sum / count, agree / count, count)


@torch.no_grad()
def greedy_answer(
    model: nn.Module, tokenizer: SmolLM2Tokenizer, question: str, max_new_tokens: int = 32
) -> str:
    """Greedy decoding (torchtune's ``generate`` with ``top_k=1`` and a KV cache) of the
    assistant's answer to ``question`` in SmolLM2's chat format, up to ``<|im_end|>``."""
    prompt, _ = tokenizer.tokenize_messages(
        [Message("user", question), Message("assistant", "")], add_end_tokens=False
    )
    dtype = next(model.parameters()).dtype
    model.setup_caches(1, dtype, decoder_max_seq_len=len(prompt) + max_new_tokens)
    try:
        output, _ = generate(
            model,
            torch.tensor(prompt),
            max_generated_tokens=max_new_tokens,
            pad_id=-1,  # no padding: the prompt's <|im_end|> (SmolLM2's pad id) is content
            top_k=1,
            stop_tokens=[tokenizer.eos_id],
        )
    finally:
        delete_kv_caches(model)
    answer = output[0, len(prompt) :].tolist()
    if tokenizer.eos_id in answer:
        answer = answer[: answer.index(tokenizer.eos_id)]
    return tokenizer.decode(answer).strip()


def evaluate_models(
    cfg: DictConfig,
    checkpoints: dict[str, str | Path],
    teacher_dir: str | Path,
    *,
    max_records: int | None,
    prompts: tuple[str, ...] = CHAT_PROMPTS,
    include_teacher: bool = True,
    log=print,
) -> list[dict]:
    """One row per model (the teacher first when ``include_teacher``): scores and greedy
    answers to ``prompts`` (none when ``prompts`` is empty)."""
    batches = held_out_batches(cfg, batch_size=4, max_records=max_records)
    tokenizer = SmolLM2Tokenizer(Path(teacher_dir))
    teacher = load_smollm2(teacher_dir)
    teacher_lp = teacher_log_probs(teacher, batches)
    models = {"teacher": teacher_dir} if include_teacher else {}
    rows = []
    for name, folder in {**models, **checkpoints}.items():
        model = teacher if name == "teacher" else load_smollm2(folder)
        scores = score(None if name == "teacher" else model, batches, teacher_lp)
        answers = [greedy_answer(model, tokenizer, q) for q in prompts]
        log(
            f"[eval] {name}: perplexity {scores.perplexity:.2f}, KL {scores.kl_to_teacher:.3f}, "
            f"top-1 {scores.top1_agreement:.3f}"
        )
        rows.append({"model": name, **asdict(scores), "answers": dict(zip(prompts, answers))})
        del model
    return rows
