"""A tiny byte-level BPE tokenizer in tiktoken format, usable through torchtune's Llama-3 tokenizer.

Layout of the ids (``vocab`` is ``"small"`` or ``"llama3"``):

* ranks ``0..255`` are the 256 single bytes (rank == byte value), so any text encodes;
* ranks ``256..BPE_VOCAB_SIZE-1`` are merges learnt in-process by :func:`train_byte_bpe`;
* ``"small"``: the 13 named Llama-3 special tokens follow at ``BPE_VOCAB_SIZE + k`` where
  ``k = canonical_id - 128000``; ``<|image|>`` (canonical 128256) takes the free slot
  ``k = 11``. The model vocabulary is :data:`SMALL_VOCAB_SIZE` (512), covering every id.
* ``"llama3"``: the canonical torchtune ``LLAMA3_SPECIAL_TOKENS`` (ids 128000..128255, and
  ``<|image|>`` = 128256). The model vocabulary is :data:`LLAMA3_VOCAB_SIZE` (128,256), so the
  ``<|image|>`` id is out of the model's range; it is only emitted for image content, never
  from text, so text-only training never sees it (ids 496..127999 are simply never produced).

``tokenizer.model`` (the BPE ranks) is the same file for both layouts; only
``special_tokens.json`` (Hugging Face ``tokenizer.json`` style ``added_tokens``, the format
torchtune's ``parse_hf_tokenizer_json`` reads) differs.
"""

from __future__ import annotations

import base64
import itertools
import json
from collections import Counter
from collections.abc import Iterable
from typing import Literal

import regex
from torchtune.models.llama3._tokenizer import CL100K_PATTERN, LLAMA3_SPECIAL_TOKENS, SPECIAL_TOKENS

Vocab = Literal["small", "llama3"]
VOCABS: tuple[str, ...] = ("small", "llama3")

NUM_BYTE_TOKENS = 256
NUM_MERGES = 240
BPE_VOCAB_SIZE = NUM_BYTE_TOKENS + NUM_MERGES  # 496 BPE ranks; small-vocab specials follow
SMALL_VOCAB_SIZE = 512
LLAMA3_VOCAB_SIZE = 128_256

_LLAMA3_FIRST_SPECIAL_ID = 128_000
_IMAGE_TOKEN = "<|image|>"
# 128011 is unused by torchtune's Llama-3 layout (reserved tokens start at 128013), so the small
# layout puts <|image|> there and the 13 named specials stay contiguous.
_SMALL_IMAGE_OFFSET = 11


def check_vocab(vocab: str) -> None:
    if vocab not in VOCABS:
        raise ValueError(f"vocab must be one of {VOCABS}, got {vocab!r}.")


def model_vocab_size(vocab: Vocab) -> int:
    """Rows of the model's embedding / output projection for this vocabulary layout."""
    check_vocab(vocab)
    return SMALL_VOCAB_SIZE if vocab == "small" else LLAMA3_VOCAB_SIZE


def special_token_ids(vocab: Vocab) -> dict[str, int]:
    """Special token -> id for the layout (see the module docstring)."""
    check_vocab(vocab)
    if vocab == "llama3":
        return dict(LLAMA3_SPECIAL_TOKENS)
    ids = {}
    for token, canonical_id in SPECIAL_TOKENS.items():
        offset = (
            _SMALL_IMAGE_OFFSET
            if token == _IMAGE_TOKEN
            else canonical_id - _LLAMA3_FIRST_SPECIAL_ID
        )
        ids[token] = BPE_VOCAB_SIZE + offset
    return ids


def special_tokens_json(vocab: Vocab) -> str:
    """``special_tokens.json`` text: HF ``tokenizer.json``-style ``added_tokens``, sorted by id."""
    added_tokens = [
        {
            "id": token_id,
            "content": token,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for token, token_id in sorted(special_token_ids(vocab).items(), key=lambda kv: kv[1])
    ]
    return json.dumps({"added_tokens": added_tokens}, indent=1) + "\n"


def _count_pairs(words: Counter[tuple[bytes, ...]]) -> Counter[tuple[bytes, bytes]]:
    pairs: Counter[tuple[bytes, bytes]] = Counter()
    for word, freq in words.items():
        for pair in itertools.pairwise(word):
            pairs[pair] += freq
    return pairs


def _merge_pair(word: tuple[bytes, ...], pair: tuple[bytes, bytes]) -> tuple[bytes, ...]:
    merged: list[bytes] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            merged.append(word[i] + word[i + 1])
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return tuple(merged)


def train_byte_bpe(texts: Iterable[str], vocab_size: int = BPE_VOCAB_SIZE) -> list[bytes]:
    """Learn byte-level BPE ranks on ``texts``; returns token bytes indexed by rank.

    The texts are split with the Llama-3 (cl100k) pre-tokenizer regex, as tiktoken will at encode
    time. Each step merges the most frequent adjacent pair; ties go to the smallest pair (bytes
    order), so the result depends only on the texts (deterministic, pure Python, well under a
    second on the tiny corpus). A merge whose bytes already are a token is applied without a new
    rank. Raises ``ValueError`` when the texts are too small to learn ``vocab_size`` tokens.
    """
    if vocab_size < NUM_BYTE_TOKENS:
        raise ValueError(f"vocab_size must be >= {NUM_BYTE_TOKENS}, got {vocab_size}.")
    pattern = regex.compile(CL100K_PATTERN)
    words: Counter[tuple[bytes, ...]] = Counter()
    for text in texts:
        for piece in pattern.findall(text):
            words[tuple(bytes([b]) for b in piece.encode("utf-8"))] += 1

    ranks = [bytes([b]) for b in range(NUM_BYTE_TOKENS)]
    known = set(ranks)
    while len(ranks) < vocab_size:
        pairs = _count_pairs(words)
        if not pairs or max(pairs.values()) < 2:
            raise ValueError(
                f"the corpus only supports {len(ranks)} BPE tokens, fewer than vocab_size="
                f"{vocab_size}; pass more text or a smaller vocab_size."
            )
        best_pair = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        new_token = best_pair[0] + best_pair[1]
        if new_token not in known:
            known.add(new_token)
            ranks.append(new_token)
        merged_words: Counter[tuple[bytes, ...]] = Counter()
        for word, freq in words.items():
            has_pair = best_pair[0] in word and best_pair[1] in word  # cheap pre-check
            merged_words[_merge_pair(word, best_pair) if has_pair else word] += freq
        words = merged_words
    return ranks


def tiktoken_file_text(ranks: list[bytes]) -> str:
    """tiktoken BPE file: one ``base64(token_bytes) rank`` line per token."""
    return "".join(
        f"{base64.b64encode(token).decode('ascii')} {rank}\n" for rank, token in enumerate(ranks)
    )
