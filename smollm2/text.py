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
