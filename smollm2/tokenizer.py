"""SmolLM2's tokenizer as a torchtune model tokenizer: byte-level BPE from ``tokenizer.json``,
ChatML messages (``<|im_start|>role\\ncontent<|im_end|>\\n``), per-message masks.

The BPE itself is torchtune's :class:`HuggingFaceBaseTokenizer` (the ``tokenizers`` library on
the model's own ``tokenizer.json``); this class adds what torchtune 0.6.1's datasets need from a
model tokenizer: ``tokenize_messages`` (for ``instruct_dataset``/``chat_dataset``), ``__call__``
and ``encode`` (for ``text_completion_dataset``), ``pad_id``, ``max_seq_len``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torchtune.data import Message, truncate
from torchtune.modules.transforms import Transform
from torchtune.modules.transforms.tokenizers import HuggingFaceBaseTokenizer, ModelTokenizer

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
"""What SmolLM2-Instruct's chat template inserts when the first message is not a system one."""


class SmolLM2Tokenizer(ModelTokenizer, Transform):
    """Byte-level BPE + ChatML for SmolLM2 (``<|im_start|>`` = BOS, ``<|im_end|>`` = EOS).

    ``stop_tokens`` (what on-policy sampling stops at): ``<|im_end|>``, the EOS token and
    ``<|endoftext|>``, each once.

    Args:
        path: folder with ``tokenizer.json`` and ``tokenizer_config.json`` (a converted or
            pruned SmolLM2 folder).
        max_seq_len: truncate every tokenised sample to this many tokens (None: no limit).
        default_system_prompt: system message put first when a conversation has none, as
            SmolLM2-Instruct's chat template does (None: add nothing).
    """

    def __init__(
        self,
        path: str | Path,
        max_seq_len: int | None = None,
        default_system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    ) -> None:
        folder = Path(path)
        self._base = HuggingFaceBaseTokenizer(
            str(folder / "tokenizer.json"),
            tokenizer_config_json_path=str(folder / "tokenizer_config.json"),
        )
        hf = self._base.tokenizer
        self.im_start_id = _special_id(hf, IM_START)
        self.im_end_id = _special_id(hf, IM_END)
        self.bos_id = self._base.bos_id
        self.eos_id = self._base.eos_id
        config = json.loads((folder / "tokenizer_config.json").read_text())
        pad_token = config.get("pad_token") or IM_END
        self.pad_id = hf.token_to_id(pad_token if isinstance(pad_token, str) else IM_END)
        self.special_tokens = {
            token.content: hf.token_to_id(token.content)
            for token in hf.get_added_tokens_decoder().values()
        }
        # sampling stops at the end of the assistant's turn (or the end of the text)
        endoftext = hf.token_to_id(ENDOFTEXT)
        self.stop_tokens = list(
            dict.fromkeys(i for i in (self.im_end_id, self.eos_id, endoftext) if i is not None)
        )
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        self.max_seq_len = max_seq_len
        self.default_system_prompt = default_system_prompt

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        """Text to ids; ``add_bos``/``add_eos`` put ``<|im_start|>``/``<|im_end|>`` around it."""
        return self._base.encode(text, add_bos=add_bos, add_eos=add_eos)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._base.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def tokenize_messages(
        self, messages: list[Message], *, add_end_tokens: bool = True
    ) -> tuple[list[int], list[bool]]:
        """ChatML ids of ``messages`` and a mask (True: no loss on that token).

        Each message is ``<|im_start|>{role}\\n{content}<|im_end|>\\n``, exactly the ids of
        SmolLM2's chat template. The header ``<|im_start|>{role}\n`` is always masked (the
        model is not trained to predict it); the rest takes the message's ``masked`` flag. With
        ``add_end_tokens=False`` the last message is left open (no ``<|im_end|>\\n``): an empty
        final assistant message then gives the generation prompt ``<|im_start|>assistant\\n``.
        """
        if self.default_system_prompt is not None and (
            not messages or messages[0].role != "system"
        ):
            messages = [Message("system", self.default_system_prompt, masked=True), *messages]
        tokens: list[int] = []
        mask: list[bool] = []
        for index, message in enumerate(messages):
            if any(item["type"] != "text" for item in message.content):
                raise ValueError(f"SmolLM2Tokenizer: message {index} has non-text content")
            # role and content are one piece of text between special tokens, as in the template
            body = self.encode(f"{message.role}\n{message.text_content}", False, False)
            header = self._header_length(message.role, body)
            ids = [self.im_start_id, *body]
            if add_end_tokens or index < len(messages) - 1:
                ids += [self.im_end_id, *self.encode("\n", False, False)]
            tokens += ids
            mask += [True] * (1 + header) + [message.masked] * (len(ids) - 1 - header)
        if self.max_seq_len is not None:
            tokens = truncate(tokens, self.max_seq_len)
            mask = truncate(mask, self.max_seq_len)
        return tokens, mask

    def _header_length(self, role: str, body: list[int]) -> int:
        """Tokens of ``role\n`` at the start of ``body`` (0 if BPE merged them with the content)."""
        header = self.encode(f"{role}\n", False, False)
        return len(header) if body[: len(header)] == header else 0

    def __call__(self, sample: Mapping[str, Any], inference: bool = False) -> Mapping[str, Any]:
        """``{"messages": [...]}`` -> the sample with ``tokens`` and ``mask`` instead."""
        sample = dict(sample)
        messages = sample.pop("messages")
        sample["tokens"], sample["mask"] = self.tokenize_messages(
            messages, add_end_tokens=not inference
        )
        return sample


def _special_id(hf_tokenizer, token: str) -> int:
    token_id = hf_tokenizer.token_to_id(token)
    if token_id is None:
        raise ValueError(f"tokenizer.json has no {token} token: not a SmolLM2 tokenizer")
    return token_id


def smollm2_tokenizer(
    path: str,
    max_seq_len: int | None = None,
    default_system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
) -> SmolLM2Tokenizer:
    """Config builder: ``tokenizer: {_component_: kdtune.smollm2.tokenizer.smollm2_tokenizer, path: DIR}``."""
    return SmolLM2Tokenizer(
        path, max_seq_len=max_seq_len, default_system_prompt=default_system_prompt
    )
