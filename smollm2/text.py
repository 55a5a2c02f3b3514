"""The demo's text: Python's own documentation prose, from the standard library.

``pydoc_data/topics.py`` (shipped with every CPython) holds the language reference topics that
``help()`` prints, ~465k characters. Every 8th topic (sorted by name) is held out. Each topic
is cut into records of about ``record_tokens`` tokens (cut on token boundaries and decoded
back), written as ``{"text": ...}`` lines for torchtune's ``text_completion_dataset``.
"""

from __future__ import annotations

import json
from pathlib import Path

HELD_OUT_EVERY = 8


def python_doc_topics() -> dict[str, str]:
    """Topic name -> text, from the running Python's ``pydoc_data.topics``."""
    from pydoc_data.topics import topics

    return dict(sorted(topics.items()))


def split_topics(topics: dict[str, str]) -> tuple[list[str], list[str]]:
    """(train texts, held-out texts): every ``HELD_OUT_EVERY``-th topic is held out."""
    texts = list(topics.values())
    held_out = texts[HELD_OUT_EVERY - 1 :: HELD_OUT_EVERY]
    train = [t for i, t in enumerate(texts) if (i + 1) % HELD_OUT_EVERY]
    return train, held_out


def to_records(texts: list[str], tokenizer, record_tokens: int) -> list[dict[str, str]]:
    """Cut each text into pieces of ``record_tokens`` tokens (the last piece may be shorter;
    pieces under a quarter of that are dropped)."""
    records = []
    for text in texts:
        ids = tokenizer.encode(text, add_bos=False, add_eos=False)
        for start in range(0, len(ids), record_tokens):
            piece = ids[start : start + record_tokens]
            if len(piece) >= record_tokens // 4:
                records.append({"text": tokenizer.decode(piece)})
    return records


def write_text_data(out_dir: Path, tokenizer, record_tokens: int) -> tuple[Path, Path]:
    """``out_dir/train.json`` and ``out_dir/val.json`` (JSON lists of ``{"text": ...}``)."""
    train, held_out = split_topics(python_doc_topics())
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, texts in (("train", train), ("val", held_out)):
        path = out_dir / f"{name}.json"
        records = to_records(texts, tokenizer, record_tokens)
        path.write_text(json.dumps(records, ensure_ascii=False))
        paths.append(path)
    return paths[0], paths[1]


# Standard-library modules whose ``pydoc`` text extends the study corpus (imported only to render
# their documentation; chosen to have no import-time side effects).
DOC_MODULES = (
    "argparse", "asyncio", "collections", "contextlib", "csv", "dataclasses", "datetime",
    "decimal", "enum", "fractions", "functools", "glob", "hashlib", "heapq", "http.client",
    "inspect", "io", "itertools", "json", "logging", "math", "os", "pathlib", "pickle", "random",
    "re", "shutil", "socket", "sqlite3", "statistics", "string", "struct", "subprocess",
    "tempfile", "textwrap", "threading", "time", "typing", "unittest", "urllib.parse", "uuid",
    "zipfile",
)  # fmt: skip


def python_module_docs(names: tuple[str, ...] = DOC_MODULES) -> dict[str, str]:
    """Module name -> its plain-text ``pydoc`` page (what ``python -m pydoc NAME`` prints)."""
    import importlib
    import pydoc

    return {
        n: pydoc.render_doc(importlib.import_module(n), renderer=pydoc.plaintext) for n in names
    }


def write_study_data(
    out_dir: Path, tokenizer, record_tokens: int, max_train_tokens: int
) -> dict[str, dict[str, int]]:
    """The recovery study's corpus: the demo's topics plus standard-library module pages.

    Documents (topics and modules alike) are held out every ``HELD_OUT_EVERY``-th, so no
    held-out document is ever trained on. ``val.json`` starts with the demo's held-out topics
    (so the first records scored are the demo's), then the held-out modules. Training records
    stop once they hold ``max_train_tokens``. Returns the split sizes
    (``{"train": {"documents", "records", "tokens"}, "val": ...}``).
    """
    topics_train, topics_val = split_topics(python_doc_topics())
    modules_train, modules_val = split_topics(python_module_docs())
    splits = {"train": topics_train + modules_train, "val": topics_val + modules_val}
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name, texts in splits.items():
        records, tokens, documents = [], 0, 0
        for text in texts:
            pieces = to_records([text], tokenizer, record_tokens)
            if name == "train" and tokens >= max_train_tokens:
                break
            documents += 1
            for piece in pieces:
                records.append(piece)
                tokens += len(tokenizer.encode(piece["text"], add_bos=False, add_eos=False))
        (out_dir / f"{name}.json").write_text(json.dumps(records, ensure_ascii=False))
        sizes[name] = {"documents": documents, "records": len(records), "tokens": tokens}
    return sizes
