"""Tiny Llama-3-architecture teacher and student builders for tests and demos.

They are thin wrappers over torchtune's ``llama3`` / ``lora_llama3`` component builders with fixed,
tiny dimensions, so a YAML config can point ``_component_`` at them:

.. code-block:: yaml

    model:
      _component_: kdtune.assets.models.tiny_student
      vocab_size: 512
    teacher_model:
      _component_: kdtune.assets.models.tiny_teacher
      vocab_size: 512

The same :class:`TinyLlamaDims` objects write the Hugging Face ``config.json`` of the tiny
checkpoints (:meth:`TinyLlamaDims.hf_config`), so a checkpoint and its builder cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torchtune.models.llama3 import llama3, lora_llama3
from torchtune.modules import TransformerDecoder


@dataclass(frozen=True)
class TinyLlamaDims:
    """Architecture hyper-parameters of one tiny Llama-3 model (everything except the vocabulary).

    ``head_dim`` is ``embed_dim // num_heads`` (torchtune's ``llama3`` builder derives it that way).
    """

    num_layers: int
    num_heads: int
    num_kv_heads: int
    embed_dim: int
    intermediate_dim: int
    max_seq_len: int = 512
    norm_eps: float = 1e-5
    rope_base: int = 500_000

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def builder_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for torchtune's ``llama3`` / ``lora_llama3`` (minus vocab and LoRA)."""
        return {
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "embed_dim": self.embed_dim,
            "intermediate_dim": self.intermediate_dim,
            "max_seq_len": self.max_seq_len,
            "norm_eps": self.norm_eps,
            "rope_base": self.rope_base,
            "attn_dropout": 0.0,
        }

    def hf_config(
        self, *, vocab_size: int, bos_token_id: int, eos_token_id: int, torch_dtype: str
    ) -> dict[str, Any]:
        """The Hugging Face ``config.json`` of a ``LlamaForCausalLM`` with these dimensions.

        It holds every key torchtune's ``FullModelHFCheckpointer`` reads for ``LLAMA3``
        (``num_attention_heads``, ``num_key_value_heads``, ``hidden_size``, ``head_dim``) plus the
        keys ``transformers`` needs to load the model. torchtune's ``llama3`` builder uses plain
        RoPE (no Llama-3.1 frequency scaling), hence ``rope_scaling: null``, and an untied output
        projection, hence ``tie_word_embeddings: false``.
        """
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": vocab_size,
            "hidden_size": self.embed_dim,
            "intermediate_size": self.intermediate_dim,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": float(self.rope_base),
            "rope_scaling": None,
            "hidden_act": "silu",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "pretraining_tp": 1,
            "initializer_range": 0.02,
            "tie_word_embeddings": False,
            "torch_dtype": torch_dtype,
            "bos_token_id": bos_token_id,
            "eos_token_id": eos_token_id,
            "use_cache": True,
        }


# The teacher is deeper and wider than the student; both share head_dim 16 and GQA (2 query heads
# per key/value head). intermediate_dim = 3 * embed_dim, close to Llama's 8/3 ratio.
TEACHER_DIMS = TinyLlamaDims(
    num_layers=4, num_heads=8, num_kv_heads=4, embed_dim=128, intermediate_dim=384
)
STUDENT_DIMS = TinyLlamaDims(
    num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, intermediate_dim=192
)


def _check_vocab_size(vocab_size: int) -> None:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
        raise ValueError(
            f"vocab_size must be a positive int, got {vocab_size!r}; use the vocab_size of the "
            "tiny assets (TinyAssets.vocab_size: 512 for vocab='small', 128256 for 'llama3')."
        )


def tiny_teacher(vocab_size: int) -> TransformerDecoder:
    """Tiny Llama-3 teacher: 4 layers, dim 128, 8 heads / 4 kv heads, MLP 384, max_seq_len 512."""
    _check_vocab_size(vocab_size)
    return llama3(vocab_size=vocab_size, **TEACHER_DIMS.builder_kwargs())


def tiny_student(vocab_size: int) -> TransformerDecoder:
    """Tiny Llama-3 student: 2 layers, dim 64, 4 heads / 2 kv heads, MLP 192, max_seq_len 512."""
    _check_vocab_size(vocab_size)
    return llama3(vocab_size=vocab_size, **STUDENT_DIMS.builder_kwargs())


def lora_tiny_student(
    vocab_size: int,
    lora_attn_modules: list[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
) -> TransformerDecoder:
    """:func:`tiny_student` with LoRA adapters (torchtune ``lora_llama3``; base weights unchanged).

    ``lora_attn_modules`` is a subset of ``["q_proj", "k_proj", "v_proj", "output_proj"]``.
    The base-model keys match :func:`tiny_student`, so the student checkpoint loads into it with
    ``strict=False`` (only the adapter keys are missing), as in torchtune's LoRA recipes.
    """
    _check_vocab_size(vocab_size)
    return lora_llama3(
        lora_attn_modules=list(lora_attn_modules),
        apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=apply_lora_to_output,
        vocab_size=vocab_size,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        **STUDENT_DIMS.builder_kwargs(),
    )
