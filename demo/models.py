"""The demo's teacher and student: tiny Llama-3 models sized for the chain task on 2 CPU cores.

YAML ``_component_`` targets, like :mod:`kdtune.assets.models` but with the demo's own fixed
dimensions (the shipped teacher's ``config.json`` must keep matching its builder, whatever the
test assets' dimensions become):

.. code-block:: yaml

    model:
      _component_: kdtune.demo.models.demo_student
      vocab_size: 384
"""

from __future__ import annotations

from torchtune.models.llama3 import llama3
from torchtune.modules import TransformerDecoder

from kdtune.assets.models import TinyLlamaDims

# Model vocabulary: the demo tokenizer's 372 ids (256 bytes, 7 prompt pieces, 2 x 48 words, 13
# special tokens) rounded up to a multiple of 64. The unused rows are never a label.
DEMO_VOCAB_SIZE = 384

# A chain answer is ~25 tokens; 128 leaves room for the longest chains (P(> 100 words) < 1e-9).
DEMO_MAX_SEQ_LEN = 128

TEACHER_DIMS = TinyLlamaDims(
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    embed_dim=128,
    intermediate_dim=384,
    max_seq_len=DEMO_MAX_SEQ_LEN,
)
STUDENT_DIMS = TinyLlamaDims(
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    embed_dim=64,
    intermediate_dim=192,
    max_seq_len=DEMO_MAX_SEQ_LEN,
)


def _check_vocab_size(vocab_size: int) -> None:
    if vocab_size != DEMO_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size!r}: the demo models use vocab_size {DEMO_VOCAB_SIZE} "
            "(the demo tokenizer's ids, padded); set model.vocab_size to it"
        )


def demo_teacher(vocab_size: int) -> TransformerDecoder:
    """Demo teacher: 4 layers, dim 128, 4 heads / 2 kv heads, MLP 384, max_seq_len 128."""
    _check_vocab_size(vocab_size)
    return llama3(vocab_size=vocab_size, **TEACHER_DIMS.builder_kwargs())


def demo_student(vocab_size: int) -> TransformerDecoder:
    """Demo student: 2 layers, dim 64, 2 heads / 1 kv head, MLP 192, max_seq_len 128."""
    _check_vocab_size(vocab_size)
    return llama3(vocab_size=vocab_size, **STUDENT_DIMS.builder_kwargs())
