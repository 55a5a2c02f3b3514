"""Packed datasets (``packed: true``): documents in one row neither attend to nor predict each
other, so a packed batch gives the loss and gradients of the same documents unpacked."""

from __future__ import annotations

import math

import pytest
import torch
from torchtune.data import padded_collate_packed, padded_collate_sft

from kdtune.assets.models import tiny_student, tiny_teacher
from kdtune.losses import CEWithChunkedOutputLoss, ForwardKLWithChunkedOutputLoss
from kdtune.losses.fused import FusedLinearKDLoss
from kdtune.recipes.knowledge_distillation import KDRecipe
from kdtune.training.config.loading import load_config, resolve_config
from kdtune.training.data import count_loss_tokens, model_inputs, shift_labels
from kdtune.training.metrics import read_metrics
from kdtune.training.steps import ChunkedLossStep, FusedLossStep

pytestmark = pytest.mark.usefixtures("one_thread_and_restored_torch_globals")

VOCAB, PAD, IGNORE = 512, 0, -100
LENGTHS = (7, 4, 9)  # three documents; packed into one row of 24 (4 padding positions)
PACKED_LENGTH = 24


def documents() -> list[dict[str, list[int]]]:
    """Token ids and labels: the first and last documents open with a 2-token prompt (ignored),
    the middle one trains on every token (so a target across its start would count)."""
    generator = torch.Generator().manual_seed(0)
    docs = []
    for index, length in enumerate(LENGTHS):
        tokens = torch.randint(1, VOCAB, (length,), generator=generator).tolist()
        labels = tokens if index == 1 else [IGNORE, IGNORE, *tokens[2:]]
        docs.append({"tokens": tokens, "labels": labels})
    return docs


def unpacked_batch() -> dict[str, torch.Tensor]:
    return padded_collate_sft(documents(), padding_idx=PAD, ignore_idx=IGNORE)


def packed_batch() -> dict[str, torch.Tensor]:
    """One row as torchtune's PackedDataset builds it, collated by torchtune."""
    docs = documents()
    padding = PACKED_LENGTH - sum(LENGTHS)
    tokens = [t for d in docs for t in d["tokens"]] + [PAD] * padding
    labels = [t for d in docs for t in d["labels"]] + [IGNORE] * padding
    positions = [p for n in LENGTHS for p in range(n)]
    positions += list(range(positions[-1] + 1, positions[-1] + 1 + padding))
    pack = {
        "tokens": torch.tensor(tokens),
        "labels": torch.tensor(labels),
        "input_pos": torch.tensor(positions),
        "seq_lens": torch.tensor([*LENGTHS, padding]),
    }
    return padded_collate_packed([pack])


def step_loss_and_grads(step, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    student, teacher = tiny_student(VOCAB), tiny_teacher(VOCAB)
    if isinstance(step, ChunkedLossStep):
        student.set_num_output_chunks(2)
        teacher.set_num_output_chunks(2)
    labels = shift_labels(batch["labels"], IGNORE, batch.get("input_pos"))
    num_tokens = count_loss_tokens([labels], IGNORE)
    out = step(student, teacher, batch["tokens"], labels, num_tokens, **model_inputs(batch))
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in student.named_parameters()}


@pytest.mark.parametrize("path", ["chunked", "fused"])
def test_packed_batch_gives_the_loss_and_gradients_of_the_unpacked_documents(path):
    if path == "chunked":
        step = ChunkedLossStep(
            CEWithChunkedOutputLoss(num_output_chunks=2),
            ForwardKLWithChunkedOutputLoss(num_output_chunks=2),
            kd_ratio=0.5,
        )
    else:
        step = FusedLossStep(FusedLinearKDLoss(), kd_ratio=0.5)
    packed, unpacked = packed_batch(), unpacked_batch()
    # The same target tokens: each document's own, none across a document boundary (a plain
    # shift of the packed row would count one more: doc 0's last position -> doc 1's first).
    unpacked_count = count_loss_tokens([shift_labels(unpacked["labels"], IGNORE)], IGNORE)
    packed_labels = shift_labels(packed["labels"], IGNORE, packed["input_pos"])
    assert count_loss_tokens([packed_labels], IGNORE) == unpacked_count
    plain_shift = shift_labels(packed["labels"], IGNORE)
    assert count_loss_tokens([plain_shift], IGNORE) == unpacked_count + 1
    loss_packed, grads_packed = step_loss_and_grads(step, packed)
    loss_unpacked, grads_unpacked = step_loss_and_grads(step, unpacked)
    torch.testing.assert_close(loss_packed, loss_unpacked, rtol=1e-5, atol=1e-6)
    for name, grad in grads_unpacked.items():
        torch.testing.assert_close(grads_packed[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_without_the_document_mask_the_loss_differs():
    """The check above bites: attending across documents changes the loss."""
    step = ChunkedLossStep(
        CEWithChunkedOutputLoss(num_output_chunks=2),
        ForwardKLWithChunkedOutputLoss(num_output_chunks=2),
        kd_ratio=0.5,
    )
    packed = packed_batch()
    causal_only = {"tokens": packed["tokens"], "labels": packed["labels"]}
    causal_only["input_pos"] = packed["input_pos"]
    loss_masked, _ = step_loss_and_grads(step, packed)
    loss_unmasked, _ = step_loss_and_grads(step, causal_only)
    # far outside the tolerance of the equality test above
    assert not torch.allclose(loss_masked, loss_unmasked, rtol=1e-5, atol=1e-6)


def test_recipe_trains_on_a_packed_dataset(tiny_assets, tmp_path):
    overrides = [
        f"assets_dir={tiny_assets.root}",
        f"output_dir={tmp_path / 'out'}",
        "dataset.packed=true",
        "max_steps_per_epoch=2",
        "validate_every_n_steps=null",
        "validation_max_batches=1",
    ]
    cfg = load_config(resolve_config("tiny/full_chunked"), overrides)
    recipe = KDRecipe(cfg=cfg)
    recipe.setup(cfg=cfg)
    batch = next(iter(recipe._dataloader))
    assert set(batch) == {"tokens", "labels", "input_pos", "mask", "sample_index"}
    recipe.train()
    recipe.cleanup()
    records = read_metrics(tmp_path / "out", kind="train")
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["num_tokens"] > 0 for r in records)
