"""On-policy generation (kdtune.training.generation) against a plain reference decoder.

The reference below decodes one prompt at a time with no KV cache, no padding and no mask: it
re-runs the whole sequence through the model at every step and samples with its own top-k /
top-p filter. The batched KV-cache decoder must produce the same tokens for every row, given the
same per-row noise stream (one ``Exp(1)`` draw of ``[V]`` per decode step from a generator
seeded with the row's seed), whatever the other rows of the batch are.
"""

from __future__ import annotations

import math

import pytest
import torch
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX
from torchtune.datasets import instruct_dataset
from torchtune.models.llama3 import llama3, llama3_tokenizer

from kdtune.training.generation import (
    SamplingOptions,
    completion_batch,
    generate,
    has_answer,
    is_on_policy_step,
    prompt_tokens,
    row_seed,
)

VOCAB = 97


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    decoder = llama3(
        vocab_size=VOCAB, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, max_seq_len=64
    )
    for parameter in decoder.parameters():  # larger weights: peaked, varied distributions
        parameter.data.mul_(3.0)
    return decoder.eval()


def reference_filter(logits: torch.Tensor, options: SamplingOptions) -> torch.Tensor:
    """Top-k then top-p on one ``[V]`` row, written plainly (a loop over sorted tokens)."""
    logits = logits / options.temperature
    order = sorted(range(logits.numel()), key=lambda v: -logits[v].item())
    keep = set(order[: options.top_k] if options.top_k else order)
    if options.top_p is not None:
        probs = torch.where(
            torch.tensor([v in keep for v in range(logits.numel())]), logits, -math.inf
        ).softmax(-1)
        mass, nucleus = 0.0, set()
        for v in order:
            if v not in keep:
                continue
            nucleus.add(v)
            mass += probs[v].item()
            if mass >= options.top_p:
                break
        keep = nucleus
    mask = torch.tensor([v not in keep for v in range(logits.numel())])
    return logits.masked_fill(mask, -math.inf)


@torch.no_grad()
def reference_generate(model, prompt, options, seed, stop_ids) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    tokens = list(prompt)
    out: list[int] = []
    for _ in range(options.max_new_tokens):
        logits = model(torch.tensor([tokens]))[0, -1].float()
        if options.temperature == 0:
            token = int(logits.argmax())
        else:
            noise = torch.empty(VOCAB).exponential_(1.0, generator=generator)
            token = int((reference_filter(logits, options).softmax(-1) / noise).argmax())
        out.append(token)
        tokens.append(token)
        if token in stop_ids:
            break
    return out


PROMPTS = [[5, 9, 13], [7], [2, 4, 6, 8, 10, 12], [3, 3]]


@pytest.mark.parametrize(
    "options",
    [
        SamplingOptions(max_new_tokens=7),
        SamplingOptions(max_new_tokens=7, temperature=0.7, top_k=5),
        SamplingOptions(max_new_tokens=7, temperature=1.3, top_p=0.8),
        SamplingOptions(max_new_tokens=5, temperature=0),
    ],
    ids=["plain", "top_k", "top_p", "greedy"],
)
def test_batched_kv_cache_decoding_equals_per_prompt_reference(model, options):
    seeds = [row_seed(0, 3, i) for i in range(len(PROMPTS))]
    stop_ids = [11, 17]
    got = generate(
        model, PROMPTS, options, seeds=seeds, stop_ids=stop_ids, pad_id=0,
        cache_dtype=torch.float32,
    )  # fmt: skip
    expected = [
        reference_generate(model, p, options, s, set(stop_ids)) for p, s in zip(PROMPTS, seeds)
    ]
    assert got.tokens == expected
    # the log-probabilities are the model's raw (temperature 1) ones of the generated tokens
    for prompt, tokens, logprobs in zip(PROMPTS, got.tokens, got.logprobs):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + tokens]))[0, len(prompt) - 1 : -1]
        picked = logits.log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(logprobs), picked, rtol=1e-5, atol=1e-5)


def test_rows_stop_at_their_stop_token_and_decoding_can_run_in_lockstep(model):
    options = SamplingOptions(max_new_tokens=12, temperature=1.0)
    seeds = [row_seed(1, 0, i) for i in range(len(PROMPTS))]
    # Stop at a common token so that rows end at different steps.
    common = torch.tensor(
        [reference_generate(model, p, options, s, set()) for p, s in zip(PROMPTS, seeds)]
    )
    stop = int(common.flatten().mode().values)
    alone = generate(
        model, PROMPTS, options, seeds=seeds, stop_ids=[stop], pad_id=0, cache_dtype=torch.float32
    )
    steps: list[int] = []

    def never_done(finished):  # another rank still has rows running
        steps.append(int(finished.sum()))
        return False

    lockstep = generate(
        model, PROMPTS, options, seeds=seeds, stop_ids=[stop], pad_id=0,
        cache_dtype=torch.float32, all_finished=never_done,
    )  # fmt: skip
    assert lockstep == alone
    alone = alone.tokens
    assert len(steps) == options.max_new_tokens - 1  # every decode step ran
    for completion in alone:
        assert stop not in completion[:-1]
        assert completion[-1] == stop or len(completion) == options.max_new_tokens
    assert any(c[-1] == stop for c in alone)


def test_row_seed_and_on_policy_schedule():
    assert row_seed(0, 1, 2) == row_seed(0, 1, 2)
    assert len({row_seed(0, 1, 2), row_seed(0, 2, 1), row_seed(1, 1, 2), row_seed(0, 1, 3)}) == 4
    for fraction in (0.0, 0.25, 0.5, 1.0, 1 / 3):
        flags = [is_on_policy_step(step, fraction) for step in range(24)]
        for n in range(1, 25):
            assert sum(flags[:n]) == math.floor(n * fraction)


def test_sampling_options_name_the_key():
    with pytest.raises(ValueError, match=r"on_policy\.max_new_tokens"):
        SamplingOptions(max_new_tokens=0)
    with pytest.raises(ValueError, match=r"on_policy\.top_p"):
        SamplingOptions(max_new_tokens=4, top_p=0.0)


def test_completion_batch_labels_only_the_generated_tokens():
    batch = completion_batch([[1, 2, 3], [4]], [[5, 6], []], pad_id=0, ignore_index=-100)
    assert batch["tokens"].tolist() == [[1, 2, 3, 5, 6], [4, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 5, 6], [-100] * 5]


def test_prompt_is_the_sample_prefix_before_the_answer(tiny_assets, tmp_path):
    records = [
        {"instruction": "Name a colour.", "output": "Blue is a colour."},
        {"instruction": "Say nothing yet.", "output": ""},
    ]
    data = tmp_path / "data.json"
    data.write_text(__import__("json").dumps(records))
    tokenizer = llama3_tokenizer(
        str(tiny_assets.tokenizer_path), special_tokens_path=str(tiny_assets.special_tokens_path)
    )
    dataset = instruct_dataset(
        tokenizer, source="json", data_files=str(data), split="train",
        column_map={"input": "instruction", "output": "output"}, train_on_input=False,
    )  # fmt: skip
    assert has_answer(dataset, 0) and not has_answer(dataset, 1)
    sample = dataset[0]
    prompt = prompt_tokens(dataset, 0)
    answer = tokenizer.encode("Blue is a colour.", add_bos=False, add_eos=False)
    # The off-policy sample is the prompt, the answer, then the end tokens.
    assert sample["tokens"][: len(prompt)] == prompt
    assert sample["tokens"][len(prompt) : len(prompt) + len(answer)] == answer
    # The user turn is masked; the assistant header (the prompt's last turn) is not.
    header = len(prompt) - 1 - prompt[::-1].index(tokenizer.special_tokens["<|start_header_id|>"])
    assert all(label == CROSS_ENTROPY_IGNORE_IDX for label in sample["labels"][:header])
    assert prompt[-1] == tokenizer.encode("\n\n", add_bos=False, add_eos=False)[-1]
    empty = prompt_tokens(dataset, 1)
    assert dataset[1]["tokens"][: len(empty)] == empty
    assert empty[-1] == prompt[-1]  # ends with the assistant header, no end-of-turn


# ------------------------------------------------------------------------------------------------
# The recipe's on-policy block and rollout (kdtune.training.on_policy)


def test_on_policy_settings_are_checked_with_the_key_named():
    from kdtune.training.on_policy import on_policy_settings

    assert on_policy_settings(None) is None
    assert on_policy_settings({"fraction": 0.0, "max_new_tokens": 4}) is None
    settings = on_policy_settings({"fraction": 0.5, "max_new_tokens": 4, "top_p": 0.9})
    assert settings.fraction == 0.5 and settings.source == "student"
    assert settings.sampling.top_p == 0.9
    bad = [
        ({"fraction": 1.5, "max_new_tokens": 4}, r"on_policy\.fraction"),
        ({"fraction": "all", "max_new_tokens": 4}, r"on_policy\.fraction"),
        ({"fraction": 1.0}, r"on_policy\.max_new_tokens is required"),
        ({"fraction": 1.0, "max_new_tokens": 2.5}, r"on_policy\.max_new_tokens"),
        ({"fraction": 1.0, "max_new_tokens": 4, "source": "oracle"}, r"on_policy\.source"),
        ({"fraction": 1.0, "max_new_tokens": 4, "topk": 3}, r"unknown key\(s\) \['topk'\]"),
    ]
    for node, message in bad:
        with pytest.raises(ValueError, match=message):
            on_policy_settings(node)


def test_rollout_replaces_answers_by_samples_and_checks_prompt_only_data(tiny_assets, tmp_path):
    import json

    from kdtune.training.on_policy import Rollout, check_answers, on_policy_settings

    records = [
        {"instruction": "Name a colour.", "output": "Blue."},
        {"instruction": "Name a tree.", "output": ""},
    ]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    tokenizer = llama3_tokenizer(
        str(tiny_assets.tokenizer_path), special_tokens_path=str(tiny_assets.special_tokens_path)
    )
    dataset = instruct_dataset(
        tokenizer, source="json", data_files=str(data), split="train",
        column_map={"input": "instruction", "output": "output"}, train_on_input=False,
    )  # fmt: skip
    mixed = on_policy_settings({"fraction": 0.5, "max_new_tokens": 5})
    with pytest.raises(ValueError, match=r"1 record\(s\) without an answer \(first: \[1\]\)"):
        check_answers(dataset, mixed)
    only = on_policy_settings({"fraction": 1.0, "max_new_tokens": 5})
    check_answers(dataset, only)  # prompt-only records are fine when every step is on-policy

    torch.manual_seed(0)
    student = llama3(
        vocab_size=tiny_assets.vocab_size, num_layers=1, num_heads=2, num_kv_heads=1,
        embed_dim=16, max_seq_len=128,
    ).train()  # fmt: skip
    rollout = Rollout(
        only, dataset, tokenizer, seed=3, ignore_index=-100, cache_dtype=torch.float32
    )
    batch = {"tokens": torch.zeros(2, 1, dtype=torch.long), "sample_index": torch.tensor([1, 0])}
    (rolled,), stats = rollout(student, [batch], step=7)
    assert student.training  # restored after sampling in eval mode
    for row, index in enumerate((1, 0)):
        prompt = prompt_tokens(dataset, index)
        tokens, labels = rolled["tokens"][row], rolled["labels"][row]
        assert tokens[: len(prompt)].tolist() == prompt
        generated = (labels != -100).nonzero().flatten()
        assert generated.tolist() == list(range(len(prompt), len(prompt) + len(generated)))
        assert 1 <= len(generated) <= 5
        assert torch.equal(labels[generated], tokens[generated])
    assert stats["generated_rows"] == 2
    assert stats["generated_tokens"] == (rolled["labels"] != -100).sum().item()
    # the same step and samples give the same sequences in any batch order (resume, ranks)
    (again,), _ = rollout(student, [{"sample_index": torch.tensor([0])}], step=7)
    width = again["tokens"].shape[1]
    assert torch.equal(again["tokens"][0], rolled["tokens"][1, :width])
