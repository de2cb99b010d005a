"""Incremental detokenization and stop strings, so streamed deltas concatenate to the final text.

Decoding token by token breaks characters split across tokens (byte-fallback pieces, multi-byte
UTF-8 in byte-level BPE). Like TGI and vLLM we decode a short window of tokens twice: the text
added by the newest tokens is released only once it no longer ends in U+FFFD. Text that could be
the start of a stop string is held back until it is known not to be one.
"""

from __future__ import annotations

from fastllm.tokenization.tokenizer import Tokenizer


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, stop: list[str] | None = None, *,
                 skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._stop = [s for s in (stop or []) if s]
        self._holdback = max((len(s) for s in self._stop), default=1) - 1
        self.text = ""  # all text decoded so far (stop string excluded once found)
        self._emitted = 0  # characters of `text` already handed out
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Feed one generated token; returns the text that is now safe to emit (may be empty)."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
        return self._release()

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def _release(self) -> str:
        if self._stop:
            # Search only where a new match can start: it may straddle earlier, emitted-pending text.
            start = max(0, self._emitted - self._holdback)
            cut = min((i for s in self._stop if (i := self.text.find(s, start)) != -1), default=-1)
            if cut != -1:
                self.text = self.text[:cut]
                self.stopped = True
                return self._take(len(self.text))
            return self._take(max(self._emitted, len(self.text) - self._holdback))
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        piece = self.text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return piece

    def flush(self) -> str:
        """At the end of generation: whatever was held back (and any trailing partial character)."""
        if self.stopped:
            return self._take(len(self.text))
        if self._read_offset < len(self._ids):
            prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
            full = self._decode(self._ids[self._prefix_offset :])
            self.text += full[len(prefix) :]
            self._read_offset = len(self._ids)
        self._holdback = 0
        return self._release()
