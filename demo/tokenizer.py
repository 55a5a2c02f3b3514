"""The demo tokenizer: byte-level tiktoken ranks plus one token per task word.

The file is in tiktoken's format (``base64(bytes) rank`` per line, written by
:func:`kdtune.assets.tokenizer.tiktoken_file_text`) and loads with torchtune's
``llama3_tokenizer(path, special_tokens_path=...)``. Ranks: the 256 single bytes, then a few
pieces of the chat prompt (so a prompt is a dozen tokens, not a hundred bytes), then each task
word twice: ``"word"`` (the first word of an answer, encoded on its own) and ``" word"`` (every
later word; tiktoken's Llama-3 pattern keeps the leading space in the word's piece). tiktoken
returns a whole piece as one token whenever the piece is in the rank table, so every word is
exactly one token and the true next-token distribution is the chain's transition row.
The 13 named Llama-3 special tokens follow the ranks, in the Hugging Face ``tokenizer.json``
style (``{"added_tokens": [{"id", "content", ...}]}``) that torchtune's
``parse_hf_tokenizer_json`` reads.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from torchtune.models.llama3._tokenizer import SPECIAL_TOKENS as LLAMA3_SPECIAL_TOKENS

from kdtune.assets.tokenizer import tiktoken_file_text
from kdtune.demo.task import ChainTask

# Pieces of "<header>user<header>\n\nContinue the chain from amber.<eot>...assistant...\n\n".
PROMPT_PIECES: tuple[str, ...] = (
    "user",
    "assistant",
    "\n\n",
    "Continue",
    " the",
    " chain",
    " from",
)

TOKENIZER_FILE = "tokenizer.model"
SPECIAL_TOKENS_FILE = "special_tokens.json"


def demo_ranks(task: ChainTask) -> list[bytes]:
    """Token bytes in rank order: the 256 bytes, the prompt pieces, then ``w`` and ``" w"``."""
    ranks = [bytes([b]) for b in range(256)]
    ranks += [piece.encode() for piece in PROMPT_PIECES]
    for word in task.words:
        ranks += [word.encode(), f" {word}".encode()]
    if len(set(ranks)) != len(ranks):
        raise ValueError("task words collide with the tokenizer's byte or prompt pieces")
    return ranks


def special_token_ids(num_ranks: int) -> dict[str, int]:
    """The named Llama-3 special tokens torchtune's Llama3Tokenizer needs, after the ranks.

    Llama-3's names in Llama-3's relative order (``<|begin_of_text|>`` first); only ids move.
    """
    names = sorted(LLAMA3_SPECIAL_TOKENS, key=LLAMA3_SPECIAL_TOKENS.__getitem__)
    return {name: num_ranks + i for i, name in enumerate(names)}


def special_tokens_json(ids: dict[str, int]) -> str:
    added = [{"id": i, "content": name, "special": True} for name, i in ids.items()]
    return json.dumps({"added_tokens": added}, indent=1) + "\n"


@dataclass(frozen=True)
class DemoTokenizerFiles:
    tokenizer_path: Path
    special_tokens_path: Path
    vocab_size: int  # ranks + special tokens: the smallest model vocabulary that fits
    sha256: str  # of both files' text, recorded in manifests to tie checkpoints to the tokenizer


def demo_tokenizer_texts(task: ChainTask) -> tuple[str, str]:
    """(tokenizer.model text, special_tokens.json text) for ``task``; deterministic."""
    ranks = demo_ranks(task)
    return tiktoken_file_text(ranks), special_tokens_json(special_token_ids(len(ranks)))


def tokenizer_sha256(task: ChainTask) -> str:
    ranks_text, specials_text = demo_tokenizer_texts(task)
    return hashlib.sha256((ranks_text + specials_text).encode()).hexdigest()


def write_demo_tokenizer(task: ChainTask, out_dir: str | Path) -> DemoTokenizerFiles:
    """Write ``tokenizer.model`` and ``special_tokens.json`` for ``task`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ranks_text, specials_text = demo_tokenizer_texts(task)
    tokenizer_path = out_dir / TOKENIZER_FILE
    special_tokens_path = out_dir / SPECIAL_TOKENS_FILE
    tokenizer_path.write_text(ranks_text)
    special_tokens_path.write_text(specials_text)
    num_tokens = len(demo_ranks(task)) + len(LLAMA3_SPECIAL_TOKENS)
    return DemoTokenizerFiles(
        tokenizer_path, special_tokens_path, num_tokens, tokenizer_sha256(task)
    )


def load_demo_tokenizer(tokenizer_dir: str | Path, max_seq_len: int | None = None):
    """torchtune's Llama3Tokenizer over the files :func:`write_demo_tokenizer` wrote."""
    from torchtune.models.llama3 import llama3_tokenizer

    tokenizer_dir = Path(tokenizer_dir)
    return llama3_tokenizer(
        str(tokenizer_dir / TOKENIZER_FILE),
        special_tokens_path=str(tokenizer_dir / SPECIAL_TOKENS_FILE),
        max_seq_len=max_seq_len,
    )


@dataclass(frozen=True)
class WordTokens:
    """Token ids of the task's answers under a tokenizer.

    Attributes:
        first: ``[W]`` id of each word as the first word of an answer (no leading space).
        later: ``[W]`` id of each word after another word (leading space).
        end: id of ``<|eot_id|>``, the token that ends an answer (the chain's end state).
    """

    first: tuple[int, ...]
    later: tuple[int, ...]
    end: int

    @classmethod
    def from_tokenizer(cls, task: ChainTask, tokenizer) -> WordTokens:
        """Look the ids up with a torchtune Llama3Tokenizer; ``ValueError`` unless one token each."""
        first, later = [], []
        for word in task.words:
            for text, into in ((word, first), (f" {word}", later)):
                ids = tokenizer.encode(text, add_bos=False, add_eos=False)
                if len(ids) != 1:
                    raise ValueError(
                        f"{text!r} encodes to {len(ids)} tokens {ids}; the demo needs one token "
                        "per word: use the tokenizer written by kdtune.demo.tokenizer"
                    )
                into.append(ids[0])
        return cls(tuple(first), tuple(later), tokenizer.eot_id)

    def answer_ids(self, output: list[int]) -> list[int]:
        """The answer's tokens for output word indices ``output``, then ``<|eot_id|>``."""
        return [self.first[output[0]], *(self.later[i] for i in output[1:]), self.end]
