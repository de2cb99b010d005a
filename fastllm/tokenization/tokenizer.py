"""The serve-side tokenizer: ``tokenizer.json`` through the Rust `tokenizers` library."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastllm.errors import ModelLoadError


class Tokenizer:
    def __init__(self, folder: Path, *, max_length: int | None = None) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        path = folder / "tokenizer.json"
        try:
            self._tok = RustTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on unreadable files
            raise ModelLoadError(f"cannot load {path}: {exc}") from None
        self._tok.no_padding()
        self._tok.no_truncation()
        self.config: dict[str, Any] = _read_json(folder / "tokenizer_config.json")
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.max_length = max_length
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [enc.ids for enc in self._tok.encode_batch(texts, add_special_tokens=True)]

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """The text one token stands for on its own, as OpenAI's logprobs `token` field shows it."""
        return self._tok.decode([token_id], skip_special_tokens=False)

    def vocabulary(self) -> dict[str, int]:
        """Every token's id, added tokens included: two models can share token ids only if this is equal."""
        return self._tok.get_vocab(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def special_token_id(self, text: str) -> int | None:
        """The id of ``text`` where it is one special token (which decoding drops unless asked not to)."""
        for token_id, token in self._tok.get_added_tokens_decoder().items():
            if token.special and token.content == text:
                return token_id
        return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json stores special tokens either as strings or as AddedToken dicts.
    if isinstance(value, dict):
        return value.get("content")
    return value
