"""Score checkpoints on the demo task's held-out answers: the quality table of ``kdtune eval``.

Inputs are what a training run used: a recipe config (its ``tokenizer``, ``model`` and
``teacher_model`` builders and ``validation_dataset``), Hugging Face checkpoint folders, and
the task (``task.json``, found next to the held-out data). Every held-out record is tokenised by
the config's own dataset component, so the positions scored are exactly those the recipe
trains on; the answer tokens of each record are checked against the task before scoring.
Metrics are defined in :mod:`kdtune.demo.metrics`.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from safetensors.torch import load_file
from torch import Tensor, nn
from torchtune import config
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, padded_collate_sft
from torchtune.models.convert_weights import hf_to_tune

from kdtune.demo.metrics import (
    MetricSums,
    SampleSums,
    true_next_token_probs,
    true_token_logprobs,
)
from kdtune.demo.task import ChainTask, parse_record, sample_answer
from kdtune.demo.tokenizer import WordTokens
from kdtune.training.checkpoint.layout import MODEL_DIRNAME, latest_checkpoint
from kdtune.training.generation import (
    SamplingOptions,
    generate,
    prompt_tokens,
    row_seed,
)
from kdtune.training.model_facts import describe_model
from kdtune.training.runtime import load_student_weights

EVAL_BATCH_SIZE = 100
SAMPLE_OPTIONS = SamplingOptions(max_new_tokens=32, temperature=1.0)
"""How the sample-based metrics sample: temperature 1 (the model's own distribution)."""
SAMPLE_SEED = 0
SAMPLE_PROMPTS = 500
"""The sample-based metrics use the first 500 held-out prompts (one answer each)."""


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A folder with ``config.json`` and safetensors weights.

    Accepts such a folder, a recipe checkpoint ``step_N`` (its ``model/``), or a recipe
    ``output_dir`` (the ``model/`` of its latest complete checkpoint).
    """
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    step = latest_checkpoint(path) or path
    model = step / MODEL_DIRNAME
    if (model / "config.json").is_file():
        return model
    if step is not path:  # an output_dir whose latest checkpoint has no model/
        raise ValueError(
            f"the latest checkpoint {step} holds no {MODEL_DIRNAME}/ folder (a run with "
            "save_adapter_weights_only: true saves only adapter/): pass a checkpoint with "
            "merged weights, or rerun with save_adapter_weights_only: false"
        )
    raise ValueError(
        f"checkpoint {str(path)!r} is neither a folder with config.json and *.safetensors, a "
        "checkpoint step_N folder nor a recipe output_dir with checkpoints/step_N: pass one of "
        "those"
    )


def weight_files(folder: Path) -> list[Path]:
    """The safetensors weight files of a checkpoint folder (adapter files left out)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / name for name in names]
    files = sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("adapter"))
    if not files:
        raise ValueError(f"no *.safetensors weights in {folder}")
    return files


def load_hf_weights(folder: Path) -> dict[str, Tensor]:
    """A Llama-family HF checkpoint folder as a torchtune-format state dict (its own dtype)."""
    hf_config = json.loads((folder / "config.json").read_text())
    state: dict[str, Tensor] = {}
    for file in weight_files(folder):
        state.update(load_file(str(file)))
    num_heads = hf_config["num_attention_heads"]
    return hf_to_tune(
        state,
        num_heads=num_heads,
        num_kv_heads=hf_config["num_key_value_heads"],
        dim=hf_config["hidden_size"],
        head_dim=hf_config.get("head_dim", hf_config["hidden_size"] // num_heads),
    )


def load_model(builder: DictConfig, checkpoint: str | Path) -> nn.Module:
    """Build ``builder`` (a ``_component_`` node) in fp32 and load the checkpoint into it.

    A LoRA builder gets the checkpoint's (merged) weights as its base, adapters untouched.
    """
    folder = resolve_checkpoint_dir(checkpoint)
    model = config.instantiate(builder)
    weights = {k: v.float() for k, v in load_hf_weights(folder).items()}
    load_student_weights(model, weights, adapter_state_dict=None)
    return model.float().eval()


@dataclass(frozen=True)
class HeldOut:
    """Held-out batches and, per batch, the task positions to score and their truth.

    ``batches[i]`` is ``{"tokens": [B, S], "labels": [B, S]}``; ``positions[i]`` is ``[N_i, 2]``
    (row, column) of the logits to score; ``true_probs[i]`` ``[N_i, V]``; ``targets[i]``
    ``[N_i]`` the observed next tokens.
    """

    batches: list[dict[str, Tensor]]
    positions: list[Tensor]
    true_probs: list[Tensor]
    targets: list[Tensor]

    @property
    def num_positions(self) -> int:
        return sum(len(t) for t in self.targets)


def build_held_out(
    task: ChainTask,
    tokenizer,
    dataset_node: DictConfig,
    records: list[dict[str, str]],
    vocab_size: int,
) -> HeldOut:
    """Tokenise ``records`` with the config's dataset component and locate the task positions.

    ``dataset_node`` must read the same file ``records`` came from (same order). Raises
    ``ValueError`` if a sample's answer tokens are not the task's (another tokenizer, a
    truncated sample, a file of another task).
    """
    dataset = config.instantiate(dataset_node, tokenizer)
    if len(dataset) != len(records):
        raise ValueError(f"the dataset has {len(dataset)} samples but the file {len(records)}")
    words = WordTokens.from_tokenizer(task, tokenizer)
    held_out = HeldOut([], [], [], [])
    for first in range(0, len(records), EVAL_BATCH_SIZE):
        indices = range(first, min(first + EVAL_BATCH_SIZE, len(records)))
        batch = padded_collate_sft(
            [dataset[i] for i in indices],
            padding_idx=tokenizer.pad_id,
            ignore_idx=CROSS_ENTROPY_IGNORE_IDX,
        )
        positions, probs, targets = [], [], []
        for row, index in enumerate(indices):
            start, output = parse_record(task, records[index])
            answer = words.answer_ids(output)
            # position t predicts token t + 1: the answer's last len(answer) labelled tokens
            labelled = (batch["labels"][row] != CROSS_ENTROPY_IGNORE_IDX).nonzero().squeeze(1)
            columns = labelled[-len(answer) :] - 1
            if batch["labels"][row, columns + 1].tolist() != answer:
                raise ValueError(
                    f"held-out record {index} does not tokenise to its answer's word tokens "
                    "(truncated by max_seq_len, or another tokenizer/task): "
                    f"{records[index]}"
                )
            positions.append(torch.stack([torch.full_like(columns, row), columns], dim=1))
            probs.append(true_next_token_probs(task, words, start, output, vocab_size))
            targets.append(torch.tensor(answer))
        held_out.batches.append(batch)
        held_out.positions.append(torch.cat(positions))
        held_out.true_probs.append(torch.cat(probs))
        held_out.targets.append(torch.cat(targets))
    return held_out


@torch.no_grad()
def task_logits(model: nn.Module, held_out: HeldOut) -> list[Tensor]:
    """The model's fp32 logits at the task positions, one ``[N_i, V]`` tensor per batch."""
    out = []
    for batch, positions in zip(held_out.batches, held_out.positions):
        logits = model(batch["tokens"])
        if isinstance(logits, list):  # a model left in chunked-output mode
            logits = torch.cat(logits, dim=1)
        out.append(logits[positions[:, 0], positions[:, 1]].float())
    return out


def score(logits: list[Tensor], held_out: HeldOut, teacher: list[Tensor] | None) -> dict:
    """The metrics of :mod:`kdtune.demo.metrics` for one model's task-position logits."""
    sums = MetricSums()
    for i, batch_logits in enumerate(logits):
        sums.add(
            batch_logits,
            held_out.true_probs[i],
            held_out.targets[i],
            None if teacher is None else teacher[i],
        )
    return sums.means()


@dataclass(frozen=True)
class HeldOutPrompts:
    """The held-out records' prompts (token ids, answer removed) and start words."""

    prompts: list[list[int]]
    starts: list[int]
    words: WordTokens
    stop_ids: list[int]
    pad_id: int
    vocab_size: int


def build_held_out_prompts(
    task: ChainTask, tokenizer, dataset_node: DictConfig, records: list[dict], vocab_size: int
) -> HeldOutPrompts:
    """Prompts tokenised as the recipe's on-policy steps tokenise them."""
    dataset = config.instantiate(dataset_node, tokenizer)
    count = min(len(records), SAMPLE_PROMPTS)
    prompts = [prompt_tokens(dataset, i) for i in range(count)]
    starts = [parse_record(task, record)[0] for record in records[:count]]
    words = WordTokens.from_tokenizer(task, tokenizer)
    return HeldOutPrompts(
        prompts, starts, words, list(tokenizer.stop_tokens), tokenizer.pad_id, vocab_size
    )


def sample_metrics(model: nn.Module, task: ChainTask, held_out: HeldOutPrompts) -> dict:
    """The sample-based metrics of :mod:`kdtune.demo.metrics` for one model.

    One answer per held-out prompt, sampled at temperature 1 with the same per-prompt seeds for
    every model (:func:`kdtune.training.generation.row_seed`).
    """
    sums = SampleSums()
    for first in range(0, len(held_out.prompts), EVAL_BATCH_SIZE):
        rows = range(first, min(first + EVAL_BATCH_SIZE, len(held_out.prompts)))
        prompts = [held_out.prompts[i] for i in rows]
        sampled = generate(
            model,
            prompts,
            SAMPLE_OPTIONS,
            seeds=[row_seed(SAMPLE_SEED, 0, i) for i in rows],
            stop_ids=held_out.stop_ids,
            pad_id=held_out.pad_id,
            cache_dtype=torch.float32,
        )
        for i, answer, logprobs in zip(rows, sampled.tokens, sampled.logprobs):
            true_logprobs, valid = true_token_logprobs(
                task, held_out.words, held_out.starts[i], answer, held_out.vocab_size
            )
            sums.add(sum(logprobs), true_logprobs, valid)
    return sums.means()


def truth_sample_metrics(task: ChainTask, held_out: HeldOutPrompts) -> dict:
    """The sample-based metrics of the true chain itself (its answers drawn by the task)."""
    rng = random.Random(SAMPLE_SEED)
    sums = SampleSums()
    for start in held_out.starts:
        output = sample_answer(task, start, rng)
        answer = held_out.words.answer_ids(output)
        true_logprobs, valid = true_token_logprobs(
            task, held_out.words, start, answer, held_out.vocab_size
        )
        exact = sum(math.log(p) for p in _true_step_probs(task, start, output))
        sums.add(exact, true_logprobs, valid)
    return sums.means()


def _true_step_probs(task: ChainTask, start: int, output: list[int]) -> list[float]:
    """Unsmoothed true probability of each step of a chain answer, the end included."""
    probs = [task.first_step_probs(start)[output[0]]]
    probs += [task.next_step_probs(a)[b] for a, b in itertools.pairwise(output)]
    return [*probs, task.next_step_probs(output[-1])[task.num_words]]


def truth_metrics(held_out: HeldOut) -> dict:
    """The scores of the true distribution itself: the floor every model is measured against."""
    logits = [p.log() for p in held_out.true_probs]
    return score(logits, held_out, teacher=None)


def find_task_file(data_file: str | Path) -> Path:
    """``task.json`` next to the data file or one folder up (the demo layout: data/val.json)."""
    data_file = Path(data_file)
    for folder in (data_file.parent, data_file.parent.parent):
        if (folder / "task.json").is_file():
            return folder / "task.json"
    raise ValueError(f"no task.json next to {data_file} or in its parent folder: pass --task PATH")


def evaluate_checkpoints(
    cfg: DictConfig,
    students: dict[str, str | Path],
    teacher: str | Path | None,
    *,
    task_file: str | Path | None = None,
) -> dict[str, dict]:
    """The table's rows: name -> metrics, for each student checkpoint and the teacher.

    Students are built with ``cfg.model``, the teacher with ``cfg.teacher_model``; the held-out
    data is ``cfg.validation_dataset`` (its ``data_files``). A ``"truth"`` row gives the true
    distribution's own CE (the data's entropy) for reference.
    """
    if cfg.validation_dataset is None:
        raise ValueError(
            "validation_dataset is null: set it to the held-out data (e.g. the demo's "
            "data/val.json) so the table has held-out metrics"
        )
    data_file = str(cfg.validation_dataset.data_files)
    task = ChainTask.load(task_file if task_file is not None else find_task_file(data_file))
    records = json.loads(Path(data_file).read_text())
    tokenizer = config.instantiate(cfg.tokenizer)
    vocab_size = describe_model(cfg.model).vocab_size  # built on the meta device
    held_out = build_held_out(task, tokenizer, cfg.validation_dataset, records, vocab_size)
    prompts = build_held_out_prompts(task, tokenizer, cfg.validation_dataset, records, vocab_size)

    teacher_logits = None
    teacher_samples: dict = {}
    rows: dict[str, dict] = {}
    if teacher is not None:
        if cfg.teacher_model is None:
            raise ValueError("teacher_model is null in the config: cannot build the teacher")
        teacher_net = load_model(cfg.teacher_model, teacher)
        teacher_logits = task_logits(teacher_net, held_out)
        teacher_samples = sample_metrics(teacher_net, task, prompts)
    for name, checkpoint in students.items():
        student = load_model(cfg.model, checkpoint)
        rows[name] = score(task_logits(student, held_out), held_out, teacher_logits)
        rows[name].update(sample_metrics(student, task, prompts))
    if teacher_logits is not None:
        rows["teacher"] = score(teacher_logits, held_out, teacher_logits) | teacher_samples
    rows["truth"] = truth_metrics(held_out) | truth_sample_metrics(task, prompts)
    return rows
