"""Tokenizers and chat templates, with the `tokenizers` library and jinja2 only (no transformers)."""

from fastllm.tokenization.chat_template import ChatTemplate
from fastllm.tokenization.tokenizer import Tokenizer

__all__ = ["ChatTemplate", "Tokenizer"]
