"""A tiny alpaca-style instruction dataset generated deterministically from templates.

Records are ``{"instruction": str, "input": str, "output": str}`` (``input`` may be empty, which
exercises alpaca's no-input prompt). Tasks are simple enough that a tiny model can learn some of
them: arithmetic, copying, reversing, upper-casing, counting, sorting and spelling. A few words
are non-ASCII so the byte-level tokenizer's multi-byte path is exercised.

The data do not depend on the assets' seed (that seed controls model weights only), so every
asset folder holds the same data and tokenizer.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable

from torchtune.data import AlpacaToMessages

Record = dict[str, str]

NUM_TRAIN_RECORDS = 300
NUM_VAL_RECORDS = 50
_DATA_SEED = 1234

WORDS = (
    "apple", "river", "blue", "cat", "dog", "green", "house", "light", "moon", "paper",
    "quiet", "red", "stone", "sun", "tree", "water", "wind", "yellow", "bird", "cloud",
    "fish", "garden", "happy", "lemon", "music", "orange", "rain", "snow", "table", "window",
    "café", "naïve", "über", "piñata", "crème",
)  # fmt: skip


def _words(rng: random.Random, low: int, high: int) -> list[str]:
    return rng.sample(WORDS, rng.randint(low, high))


def _add(rng: random.Random) -> Record:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return {"instruction": "Add the two numbers.", "input": f"{a} + {b}", "output": str(a + b)}


def _subtract(rng: random.Random) -> Record:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    a, b = max(a, b), min(a, b)
    return {
        "instruction": "Subtract the second number from the first.",
        "input": f"{a} - {b}",
        "output": str(a - b),
    }


def _multiply(rng: random.Random) -> Record:
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return {"instruction": f"What is {a} times {b}?", "input": "", "output": str(a * b)}


def _copy(rng: random.Random) -> Record:
    text = " ".join(_words(rng, 2, 6))
    return {"instruction": "Repeat the input exactly.", "input": text, "output": text}


def _reverse(rng: random.Random) -> Record:
    words = _words(rng, 2, 6)
    return {
        "instruction": "Reverse the order of the words.",
        "input": " ".join(words),
        "output": " ".join(reversed(words)),
    }


def _upper(rng: random.Random) -> Record:
    text = " ".join(_words(rng, 1, 4))
    return {
        "instruction": "Write the input in capital letters.",
        "input": text,
        "output": text.upper(),
    }


def _count(rng: random.Random) -> Record:
    words = _words(rng, 1, 8)
    return {
        "instruction": "How many words are in the input?",
        "input": " ".join(words),
        "output": str(len(words)),
    }


def _sort(rng: random.Random) -> Record:
    numbers = rng.sample(range(100), rng.randint(3, 6))
    return {
        "instruction": "Sort the numbers from smallest to largest.",
        "input": ", ".join(map(str, numbers)),
        "output": ", ".join(map(str, sorted(numbers))),
    }


def _spell(rng: random.Random) -> Record:
    word = rng.choice(WORDS)
    return {
        "instruction": "Spell the word letter by letter.",
        "input": word,
        "output": " ".join(word),
    }


TASKS: tuple[Callable[[random.Random], Record], ...] = (
    _add, _subtract, _multiply, _copy, _reverse, _upper, _count, _sort, _spell,
)  # fmt: skip


def instruction_records(split: str) -> list[Record]:
    """The ``"train"`` (300) or ``"val"`` (50) records; no (instruction, input) pair repeats
    within or across the splits. Same list on every call and machine."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}.")
    rng = random.Random(_DATA_SEED)
    seen: set[tuple[str, str]] = set()
    records: list[Record] = []
    # Tasks take turns per attempt (not per kept record), so a task whose few distinct records
    # are used up (spelling has one per word) cannot stall the loop.
    attempt = 0
    while len(records) < NUM_TRAIN_RECORDS + NUM_VAL_RECORDS:
        record = TASKS[attempt % len(TASKS)](rng)
        attempt += 1
        key = (record["instruction"], record["input"])
        if key not in seen:
            seen.add(key)
            records.append(record)
    return records[:NUM_TRAIN_RECORDS] if split == "train" else records[NUM_TRAIN_RECORDS:]


def records_json(records: list[Record]) -> str:
    """A JSON array of records, the layout ``datasets.load_dataset("json", ...)`` reads."""
    return json.dumps(records, ensure_ascii=False, indent=1) + "\n"


def tokenizer_corpus() -> list[str]:
    """Texts the BPE merges are learnt on: every record as the alpaca prompt + response torchtune
    will tokenise, plus the chat-header role names, so frequent pieces become single tokens."""
    to_messages = AlpacaToMessages(train_on_input=False)
    texts = ["system", "user", "assistant", "ipython"]
    for split in ("train", "val"):
        for record in instruction_records(split):
            for message in to_messages(record)["messages"]:
                texts.append(message.text_content)
    return texts
