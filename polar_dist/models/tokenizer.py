"""Tokenizers: the model directory's own (Hugging Face), or bytes for random-weight models."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from polar_dist.errors import UserError


class Tokenizer(Protocol):
    eos_token_ids: tuple[int, ...]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def token_text(self, token_id: int) -> str:
        """One token's own text (special tokens included), as logprobs report it."""
        ...

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """The prompt ids of a chat, rendered by the model's chat template with the assistant's
        turn opened. Raises UserError when the model has no template or the template refuses the
        messages."""
        ...


class HFTokenizer:
    def __init__(self, directory: Path, eos_token_ids: tuple[int, ...]) -> None:
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(str(directory))
        self.eos_token_ids = eos_token_ids or ((self._tok.eos_token_id,) if self._tok.eos_token_id is not None else ())

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=True)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        return self._tok.decode([token_id], skip_special_tokens=False)

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        if not self._tok.chat_template:
            raise UserError("this model's tokenizer has no chat template; use /v1/completions with a prompt")
        from jinja2 import TemplateError

        try:
            text = self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except TemplateError as e:  # the template's own checks (e.g. roles that must alternate)
            raise UserError(f"the model's chat template refused the messages: {e}") from None
        # the template writes the special tokens itself (e.g. <|im_start|>): add none twice
        return self._tok.encode(text, add_special_tokens=False)


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255. Generated ids beyond a byte (random models) decode to nothing;
    their ids are still reported in token_ids."""

    eos_token_ids: tuple[int, ...] = ()

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def token_text(self, token_id: int) -> str:
        return self.decode([token_id])

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        raise UserError("the byte tokenizer (model.tokenizer = bytes) has no chat template; use /v1/completions "
                        "with a prompt")
