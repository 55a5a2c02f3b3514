"""The demo task (chain generator, sampler), its tokenizer and its held-out metrics."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch
from torchtune.data import Message

from kdtune.demo.metrics import MetricSums, kl_per_row, true_next_token_probs, truth_entropy
from kdtune.demo.task import (
    ChainTask,
    make_task,
    parse_record,
    sample_chain,
    sample_records,
    start_word_of,
)
from kdtune.demo.tokenizer import WordTokens, load_demo_tokenizer, write_demo_tokenizer

TASK_KWARGS = dict(
    num_words=12,
    min_successors=2,
    max_successors=4,
    min_end_prob=0.1,
    max_end_prob=0.3,
    dirichlet_alpha=1.0,
)


def small_task(seed: int = 0) -> ChainTask:
    return make_task(seed=seed, **TASK_KWARGS)


def test_task_is_deterministic_and_seed_dependent():
    assert small_task(0) == small_task(0)
    assert small_task(0).transitions != small_task(1).transitions


def test_task_rows_are_distributions_with_the_requested_shape():
    task = small_task(3)
    for row in task.transitions:
        assert len(row) == task.num_words + 1
        assert all(p >= 0 for p in row)
        assert math.fsum(row) == pytest.approx(1.0, abs=1e-12)
        successors = sum(p > 0 for p in row[:-1])
        assert 2 <= successors <= 4
        assert 0.1 <= row[-1] <= 0.3


def test_first_step_excludes_the_end_and_is_renormalised():
    task = small_task(4)
    for start in range(task.num_words):
        first = task.first_step_probs(start)
        row = task.transitions[start]
        assert len(first) == task.num_words
        assert math.fsum(first) == pytest.approx(1.0, abs=1e-12)
        for p_first, p_row in zip(first, row[:-1]):
            assert p_first == pytest.approx(p_row / (1 - row[-1]))


def test_task_json_round_trip(tmp_path):
    task = small_task(5)
    task.save(tmp_path / "task.json")
    assert ChainTask.load(tmp_path / "task.json") == task


def test_malformed_task_is_rejected():
    bad = small_task(0).to_json()
    bad["transitions"][0] = [0.5] * (len(bad["words"]) + 1)
    with pytest.raises(ValueError, match="transitions\\[0\\]"):
        ChainTask.from_json(bad)
    with pytest.raises(ValueError, match="num_words"):
        make_task(seed=0, **{**TASK_KWARGS, "num_words": 10_000})


def _tolerance(p: float, n: int) -> float:
    # 5 binomial standard deviations, plus a floor so p = 0 allows no count at all
    return 5 * math.sqrt(p * (1 - p) / n) + 1e-12


def test_sampler_follows_the_true_distributions():
    """Empirical first-step and later-step frequencies match the task's rows."""
    task = make_task(seed=6, **{**TASK_KWARGS, "num_words": 6})
    rng = random.Random(0)
    first_counts: dict[int, Counter] = {i: Counter() for i in range(task.num_words)}
    next_counts: dict[int, Counter] = {i: Counter() for i in range(task.num_words)}
    for _ in range(8_000):
        start, output = sample_chain(task, rng)
        first_counts[start][output[0]] += 1
        for word, nxt in zip(output, [*output[1:], task.num_words]):
            next_counts[word][nxt] += 1
    for start, counts in first_counts.items():
        n = sum(counts.values())
        for j, p in enumerate(task.first_step_probs(start)):
            assert abs(counts[j] / n - p) <= _tolerance(p, n), (start, j)
    for word, counts in next_counts.items():
        n = sum(counts.values())
        if n == 0:  # a word no row leads to is never an output word
            assert all(task.transitions[i][word] == 0 for i in range(task.num_words))
            continue
        for j, p in enumerate(task.next_step_probs(word)):
            assert abs(counts[j] / n - p) <= _tolerance(p, n), (word, j)


def test_records_are_alpaca_style_and_parse_back():
    task = small_task(7)
    records = sample_records(task, 50, seed=1)
    assert records == sample_records(task, 50, seed=1)
    for record in records:
        assert set(record) == {"instruction", "input", "output"}
        start, output = parse_record(task, record)
        assert task.words[start] == start_word_of(record["instruction"])
        assert record["output"] == " ".join(task.words[i] for i in output)
        assert output  # at least one word
    with pytest.raises(ValueError, match="not a chain instruction"):
        start_word_of("Add the two numbers.")


@pytest.fixture(scope="module")
def default_task_tokenizer(tmp_path_factory):
    task = make_task(
        seed=0,
        num_words=48,
        min_successors=4,
        max_successors=8,
        min_end_prob=0.1,
        max_end_prob=0.3,
        dirichlet_alpha=1.0,
    )
    out = tmp_path_factory.mktemp("demo_tokenizer")
    files = write_demo_tokenizer(task, out)
    return task, files, load_demo_tokenizer(out)


def test_every_word_is_one_token_in_both_positions(default_task_tokenizer):
    task, files, tokenizer = default_task_tokenizer
    tokens = WordTokens.from_tokenizer(task, tokenizer)
    all_ids = [*tokens.first, *tokens.later, tokens.end]
    assert len(set(all_ids)) == len(all_ids)
    assert max(all_ids) < files.vocab_size == tokenizer.vocab_size
    for i, word in enumerate(task.words):
        assert tokenizer.decode([tokens.first[i]]) == word
        assert tokenizer.decode([tokens.later[i]]) == f" {word}"


def test_answer_tokens_match_the_chat_tokenization(default_task_tokenizer):
    """The labelled tail of a tokenized record is one token per word, then <|eot_id|>."""
    task, _, tokenizer = default_task_tokenizer
    tokens = WordTokens.from_tokenizer(task, tokenizer)
    for record in sample_records(task, 20, seed=2):
        messages = [
            Message(role="user", content=record["instruction"], masked=True),
            Message(role="assistant", content=record["output"], masked=False),
        ]
        ids, mask = tokenizer.tokenize_messages(messages)
        labelled = [t for t, masked in zip(ids, mask) if not masked]
        _, output = parse_record(task, record)
        assert labelled[-(len(output) + 1) :] == tokens.answer_ids(output)
        assert len(ids) < 64  # prompt pieces are single tokens: the sequences stay short


def test_tokenizer_files_are_deterministic(default_task_tokenizer, tmp_path):
    task, files, _ = default_task_tokenizer
    again = write_demo_tokenizer(task, tmp_path)
    assert again.sha256 == files.sha256
    assert again.tokenizer_path.read_bytes() == files.tokenizer_path.read_bytes()


# ---- metrics against plain references ----


def _reference_kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def _softmax(row: list[float]) -> list[float]:
    m = max(row)
    e = [math.exp(x - m) for x in row]
    return [x / sum(e) for x in e]


def test_true_next_token_probs_places_the_rows_on_the_word_tokens():
    task = small_task(8)
    tokens = WordTokens(
        first=tuple(range(10, 10 + task.num_words)),
        later=tuple(range(40, 40 + task.num_words)),
        end=99,
    )
    output = [3, 0, 3]
    probs = true_next_token_probs(task, tokens, start=5, output=output, vocab_size=100)
    assert probs.shape == (4, 100)
    expected = torch.zeros(4, 100, dtype=torch.float64)
    for j in range(task.num_words):
        expected[0, 10 + j] = task.transitions[5][j] / (1 - task.transitions[5][-1])
        for k, word in enumerate(output, start=1):
            expected[k, 40 + j] = task.transitions[word][j]
    for k, word in enumerate(output, start=1):
        expected[k, 99] = task.transitions[word][-1]
    torch.testing.assert_close(probs, expected)


def test_metrics_of_the_truth_and_of_uniform_match_references():
    gen = torch.Generator().manual_seed(0)
    n, vocab = 7, 11
    truth = torch.rand(n, vocab, generator=gen, dtype=torch.float64)
    truth[:, :4] = 0.0  # zero columns, as for tokens that are never a next word
    truth /= truth.sum(-1, keepdim=True)
    targets = torch.multinomial(truth, 1, generator=gen).squeeze(1)

    exact = MetricSums()
    exact.add(truth.log(), truth, targets, teacher_logits=truth.log())
    means = exact.means()
    assert means["true_kl"] == pytest.approx(0.0, abs=1e-12)
    assert means["teacher_kl"] == pytest.approx(0.0, abs=1e-12)
    assert means["top1"] == 1.0
    reference_ce = -sum(math.log(truth[i, targets[i]].item()) for i in range(n)) / n
    assert means["ce"] == pytest.approx(reference_ce)
    assert means["ppl"] == pytest.approx(math.exp(reference_ce))

    uniform = MetricSums()
    uniform.add(torch.zeros(n, vocab), truth, targets, teacher_logits=None)
    entropies = [-sum(p * math.log(p) for p in row if p > 0) for row in truth.tolist()]
    assert uniform.means()["true_kl"] == pytest.approx(
        sum(math.log(vocab) - h for h in entropies) / n
    )
    assert uniform.means()["ce"] == pytest.approx(math.log(vocab))
    assert math.isnan(uniform.means()["teacher_kl"])
    torch.testing.assert_close(truth_entropy(truth), torch.tensor(entropies, dtype=torch.float64))


def test_metrics_of_arbitrary_logits_match_references():
    gen = torch.Generator().manual_seed(1)
    n, vocab = 5, 9
    truth = torch.softmax(torch.randn(n, vocab, generator=gen, dtype=torch.float64), -1)
    logits = torch.randn(n, vocab, generator=gen)
    teacher = torch.randn(n, vocab, generator=gen)
    targets = torch.randint(vocab, (n,), generator=gen)
    sums = MetricSums()
    sums.add(logits[:2], truth[:2], targets[:2], teacher[:2])  # sums accumulate over calls
    sums.add(logits[2:], truth[2:], targets[2:], teacher[2:])
    means = sums.means()
    q = [_softmax(row) for row in logits.double().tolist()]
    p_teacher = [_softmax(row) for row in teacher.double().tolist()]
    p_true = truth.tolist()
    assert means["true_kl"] == pytest.approx(
        sum(_reference_kl(p_true[i], q[i]) for i in range(n)) / n
    )
    assert means["teacher_kl"] == pytest.approx(
        sum(_reference_kl(p_teacher[i], q[i]) for i in range(n)) / n
    )
    assert means["ce"] == pytest.approx(
        -sum(math.log(q[i][targets[i]]) for i in range(n)) / n, rel=1e-6
    )
    top1 = sum(max(range(vocab), key=q[i].__getitem__) == max(range(vocab), key=p_true[i].__getitem__)
               for i in range(n)) / n  # fmt: skip
    assert means["top1"] == pytest.approx(top1)


def test_kl_per_row_ignores_zero_probability_columns():
    log_p = torch.tensor([[0.0, -math.inf]], dtype=torch.float64)
    log_q = torch.tensor([[math.log(0.5), math.log(0.5)]], dtype=torch.float64)
    assert kl_per_row(log_p, log_q).item() == pytest.approx(math.log(2))


def test_empty_metric_sums_raise():
    with pytest.raises(ValueError, match="no task positions"):
        MetricSums().means()
