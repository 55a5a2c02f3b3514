"""The demo task: a Markov chain over words whose next-word distributions are known exactly.

Each record asks the model to continue a chain from a start word::

    {"instruction": "Continue the chain from amber.", "input": "", "output": "cedar dune kelp"}

The chain has ``W`` words. Word ``i`` moves to one of a few successors (4 to 8 by default, drawn
without replacement) with Dirichlet-drawn probabilities, or ends the chain with its own end
probability. The first output word is drawn from the start word's successors *without* the end
option (an answer always has at least one word); every later step may end.

Because the process is known, so is the true distribution of every next output token: a model
can be scored by its KL divergence to the truth, not only by its cross-entropy on samples. And
the teacher's soft targets carry the whole successor row at every position, which one sampled
label cannot: that is what distillation has to teach a student fine-tuned on a small set.

Everything is generated from a seed with :class:`random.Random` (stable across platforms and
Python versions), and a task round-trips through JSON so evaluation reads the exact numbers.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

# Letters only, lowercase, distinct: tiktoken's Llama-3 pattern keeps " word" (leading space
# included) in one regex piece, so each word becomes one token once the piece is in the ranks.
WORD_POOL: tuple[str, ...] = (
    "amber", "birch", "cedar", "delta", "ember", "fjord", "glade", "harbor",
    "iris", "jade", "koala", "lemon", "maple", "nectar", "olive", "pebble",
    "quartz", "raven", "sage", "tulip", "umber", "velvet", "willow", "yarrow",
    "zephyr", "acorn", "bramble", "coral", "dune", "falcon", "garnet", "heron",
    "ivory", "juniper", "kelp", "lotus", "meadow", "nutmeg", "orchid", "poppy",
    "quill", "reed", "spruce", "thistle", "urchin", "violet", "walnut", "yucca",
    "aspen", "basil", "clover", "dahlia", "egret", "fennel", "ginger", "hazel",
    "indigo", "jasper", "lilac", "mango", "nettle", "opal", "plum", "rowan",
)  # fmt: skip

INSTRUCTION_PREFIX = "Continue the chain from "
INSTRUCTION_SUFFIX = "."


@dataclass(frozen=True)
class ChainTask:
    """A word-level Markov chain with an end state.

    Attributes:
        seed: the seed the task was generated from (recorded, not used after generation).
        words: the ``W`` words, in token order.
        transitions: ``W`` rows of ``W + 1`` probabilities; row ``i`` gives the probability of
            each next word after word ``i``, and its last entry the probability of ending.
            Every row sums to 1.
    """

    seed: int
    words: tuple[str, ...]
    transitions: tuple[tuple[float, ...], ...]

    @property
    def num_words(self) -> int:
        return len(self.words)

    def index_of(self, word: str) -> int:
        """The index of ``word``; ``ValueError`` if it is not one of the task's words."""
        try:
            return self.words.index(word)
        except ValueError:
            raise ValueError(f"word {word!r} is not in the task's vocabulary") from None

    def first_step_probs(self, start: int) -> list[float]:
        """Distribution of the first output word after start word ``start``: ``W`` entries.

        The start word's successor row without the end option, renormalised.
        """
        row = self.transitions[start]
        keep = 1.0 - row[-1]
        return [p / keep for p in row[:-1]]

    def next_step_probs(self, word: int) -> list[float]:
        """Distribution after a later output word ``word``: ``W`` words, then the end."""
        return list(self.transitions[word])

    def to_json(self) -> dict:
        return {
            "seed": self.seed,
            "words": list(self.words),
            "transitions": [list(row) for row in self.transitions],
        }

    @classmethod
    def from_json(cls, data: dict) -> ChainTask:
        task = cls(
            seed=int(data["seed"]),
            words=tuple(data["words"]),
            transitions=tuple(tuple(float(p) for p in row) for row in data["transitions"]),
        )
        _check_task(task)
        return task

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ChainTask:
        return cls.from_json(json.loads(Path(path).read_text()))


def _check_task(task: ChainTask) -> None:
    """Raise ``ValueError`` if the words or the transition rows are malformed."""
    if len(set(task.words)) != len(task.words) or not all(w.isalpha() for w in task.words):
        raise ValueError(f"task words must be distinct and letters only, got {task.words}")
    for i, row in enumerate(task.transitions):
        if len(row) != task.num_words + 1:
            raise ValueError(f"transitions[{i}] has {len(row)} entries, expected W + 1")
        if any(p < 0 for p in row) or abs(sum(row) - 1.0) > 1e-9:
            raise ValueError(f"transitions[{i}] is not a probability vector: {row}")
        if row[-1] >= 1.0:
            raise ValueError(f"transitions[{i}] ends with probability 1; no first step exists")


def make_task(
    *,
    seed: int,
    num_words: int,
    min_successors: int,
    max_successors: int,
    min_end_prob: float,
    max_end_prob: float,
    dirichlet_alpha: float,
) -> ChainTask:
    """Generate a task deterministically from ``seed``.

    Row ``i``: ``k ~ U{min_successors..max_successors}`` successors drawn without replacement
    from all words (self-loops allowed), weights ``~ Dirichlet(dirichlet_alpha)``, an end
    probability ``~ U[min_end_prob, max_end_prob]``, and the weights scaled by
    ``1 - end``.
    """
    if not 1 <= num_words <= len(WORD_POOL):
        raise ValueError(f"num_words={num_words} must be in [1, {len(WORD_POOL)}]")
    if not 1 <= min_successors <= max_successors <= num_words:
        raise ValueError(
            f"need 1 <= min_successors ({min_successors}) <= max_successors "
            f"({max_successors}) <= num_words ({num_words})"
        )
    if not 0.0 < min_end_prob <= max_end_prob < 1.0:
        raise ValueError(
            f"need 0 < min_end_prob ({min_end_prob}) <= max_end_prob ({max_end_prob}) < 1"
        )
    if dirichlet_alpha <= 0:
        raise ValueError(f"dirichlet_alpha must be positive, got {dirichlet_alpha}")
    rng = random.Random(seed)
    words = tuple(WORD_POOL[:num_words])
    rows = []
    for _ in range(num_words):
        successors = rng.sample(range(num_words), rng.randint(min_successors, max_successors))
        gammas = [rng.gammavariate(dirichlet_alpha, 1.0) for _ in successors]
        end = rng.uniform(min_end_prob, max_end_prob)
        row = [0.0] * (num_words + 1)
        for j, g in zip(successors, gammas):
            row[j] = (1.0 - end) * g / sum(gammas)
        row[-1] = end
        rows.append(tuple(row))
    task = ChainTask(seed=seed, words=words, transitions=tuple(rows))
    _check_task(task)
    return task


def instruction_for(start_word: str) -> str:
    return f"{INSTRUCTION_PREFIX}{start_word}{INSTRUCTION_SUFFIX}"


def start_word_of(instruction: str) -> str:
    """Inverse of :func:`instruction_for`; ``ValueError`` for any other text."""
    if not (instruction.startswith(INSTRUCTION_PREFIX) and instruction.endswith(".")):
        raise ValueError(f"not a chain instruction: {instruction!r}")
    return instruction[len(INSTRUCTION_PREFIX) : -len(INSTRUCTION_SUFFIX)]


def _draw(rng: random.Random, probs: list[float]) -> int:
    """One index drawn from ``probs`` (``random.choices`` uses one uniform per draw)."""
    return rng.choices(range(len(probs)), weights=probs)[0]


def sample_chain(task: ChainTask, rng: random.Random) -> tuple[int, list[int]]:
    """One (start word, output words) pair, as word indices; the output has >= 1 word."""
    start = rng.randrange(task.num_words)
    return start, sample_answer(task, start, rng)


def sample_answer(task: ChainTask, start: int, rng: random.Random) -> list[int]:
    """The output words of one answer after start word ``start`` (>= 1 word), as indices."""
    output = [_draw(rng, task.first_step_probs(start))]
    while True:
        step = _draw(rng, task.next_step_probs(output[-1]))
        if step == task.num_words:  # the end column
            return output
        output.append(step)


def sample_records(task: ChainTask, num_records: int, *, seed: int) -> list[dict[str, str]]:
    """``num_records`` alpaca-style records (instruction / input / output), from ``seed``."""
    rng = random.Random(seed)
    records = []
    for _ in range(num_records):
        start, output = sample_chain(task, rng)
        records.append(
            {
                "instruction": instruction_for(task.words[start]),
                "input": "",
                "output": " ".join(task.words[i] for i in output),
            }
        )
    return records


def parse_record(task: ChainTask, record: dict[str, str]) -> tuple[int, list[int]]:
    """(start word, output words) indices of a record; ``ValueError`` if it is not this task's."""
    start = task.index_of(start_word_of(record["instruction"]))
    output = [task.index_of(word) for word in record["output"].split(" ")]
    return start, output
