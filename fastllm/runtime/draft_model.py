"""Speculative decoding's second drafter: a small model that shares the served model's tokenizer.

Prompt lookup (``speculation.PromptLookupDrafter``) drafts only where the text repeats itself; a draft model
guesses everywhere, at the price of its own decode steps: Qwen2.5-Coder-0.5B drafting for the 1.5B, as
llama.cpp's ``--model-draft`` and vLLM's draft-model method do. It drafts greedily, so its proposal is a point
mass like prompt lookup's and the engine verifies it the same way (sample from the served model, accept while
equal), which keeps outputs' distribution and greedy outputs' tokens.

The drafter keeps its own KV cache for the one sequence that speculates (the engine speculates only while a
single request decodes): at each draft it finds how much of the sequence its cache already holds (everything
but what the served model rejected, and the tokens accepted since), forgets the rest by shortening the cache's
length (shared buffers, as in the engine: what lies past a row's length is masked and overwritten), feeds
the new tokens in one multi-token step, then decodes its guesses one step each.
"""

from __future__ import annotations

import numpy as np

from fastllm.errors import ModelLoadError
from fastllm.runtime.decoder import Decoder, StepOutput
from fastllm.runtime.kv_cache import BatchCache

# Prompt tokens the draft model takes per step when it catches up on a new sequence.
_CHUNK = 512


class ModelDrafter:
    """Drafts the next tokens with a draft model's greedy decoding.

    Each drafted token costs one draft-model step, so the draft length grows by one while all are accepted and
    falls back to one past what was accepted (prompt lookup's doubling suits guesses that cost nothing)."""

    first_length = 4

    def __init__(self, decoder: Decoder, max_tokens: int, context_length: int) -> None:
        if not (decoder.right_padded and decoder.shares_kv and decoder.multi_position_logits):
            raise ModelLoadError("the draft model must be a fused-graph export by this version (its cache is "
                                 "rolled back to what the served model accepted, in shared KV buffers)")
        self.decoder = decoder
        self.max_tokens = max_tokens
        self.context_length = context_length
        self._cache: BatchCache | None = None
        self._tokens = np.empty(0, dtype=np.int64)  # the tokens whose keys/values the cache holds, in order

    def next_length(self, length: int, drafted: int, accepted: int) -> int:
        if accepted == drafted:
            return min(max(length, drafted) + 1, self.max_tokens)
        return max(1, accepted + 1)

    def draft(self, history: np.ndarray, limit: int) -> list[int]:
        """``limit`` tokens (at most ``max_tokens``) the draft model would write after ``history``."""
        limit = min(limit, self.max_tokens)
        if limit <= 0 or len(history) + limit > self.context_length:
            return []
        held = self._held(history)
        if held == 0:
            self._cache = BatchCache(right_padded=True, shared=True)
        else:
            self._cache.lengths[0] = held  # forget what the served model did not keep
        out: StepOutput | None = None
        for start in range(held, len(history), _CHUNK):
            out = self._feed(history[start: start + _CHUNK], start)
        assert out is not None  # the history always has a token the cache does not hold: the one just sampled
        drafts: list[int] = []
        while True:
            drafts.append(int(np.argmax(out.logits[0])))
            if len(drafts) == limit:
                break
            out = self._feed(np.asarray(drafts[-1:]), len(history) + len(drafts) - 1)
        self._tokens = np.concatenate([history, np.asarray(drafts[:-1], dtype=np.int64)])
        return drafts

    def close(self) -> None:
        self._cache, self._tokens = None, self._tokens[:0]
        self.decoder.release()

    def _held(self, history: np.ndarray) -> int:
        """How many of ``history``'s first tokens the cache holds, leaving at least the last one to feed."""
        span = min(len(self._tokens), len(history) - 1)  # no tokens held without a cache (see close)
        if span <= 0:
            return 0
        differs = np.flatnonzero(self._tokens[:span] != history[:span])
        return int(differs[0]) if differs.size else span

    def _feed(self, ids: np.ndarray, start: int) -> StepOutput:
        """Run ``ids`` (positions ``start``...) on the cache and keep their keys/values."""
        assert self._cache is not None
        new = len(ids)
        if self._cache.rows == 0:
            out = self.decoder.prefill([ids.tolist()])
            self._cache.join(out.present, [new])
            return out
        out = self.decoder.forward(np.asarray([ids], dtype=np.int64), self._cache.next_mask(new),
                                   np.arange(start, start + new, dtype=np.int64)[None], self._cache.next_past(new),
                                   in_place=True)
        self._cache.step(out.present, np.asarray([new]) if new > 1 else None)
        return out
