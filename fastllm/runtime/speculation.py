"""Speculative decoding's drafter: prompt lookup, which guesses the next tokens from the sequence's own past.

Agents, RAG answers and code edits repeat long stretches of their input: a patched function is mostly the
function it patches, an answer quotes its documents. When the last few tokens occurred before, the tokens that
followed them then are a cheap guess at what follows now. The engine feeds the guess after the row's next token
in one multi-token step (a decode step that, like a chunked prefill, computes several positions on a past),
and keeps the drafted tokens up to the first that the row's own sampler would not have chosen. A decode step
on a CPU or a GPU is bound by reading the weights, not by the handful of positions it computes, so every
accepted token is nearly free; a wrong guess costs little.

The drafts are a point mass (no draft probabilities), so the standard speculative-sampling rule reduces to:
sample each position from the model's own distribution, accept while the sample equals the draft. Outputs
keep their distribution, and greedy outputs their tokens (up to the rounding of a multi-token step, see the
note in docs/speculative-decoding.md). llama.cpp's lookup decoding and vLLM's ``ngram`` method work this way.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


class Drafter(Protocol):
    """What the engine asks of a drafter: prompt lookup (below) or a draft model (runtime.draft_model)."""

    first_length: int

    def draft(self, history: np.ndarray, limit: int) -> list[int]:
        """Up to ``limit`` tokens guessed to follow ``history`` (the sequence's prompt and output so far)."""
        ...

    def next_length(self, length: int, drafted: int, accepted: int) -> int:
        """How many to draft next, after ``accepted`` of ``drafted`` were kept."""
        ...

    def close(self) -> None: ...


class TokenHistory:
    """A sequence's prompt and output as one growing int64 array, so a lookup never rebuilds it."""

    def __init__(self, prompt: list[int]) -> None:
        self._buffer = np.empty(max(2 * len(prompt), 64), dtype=np.int64)
        self._buffer[: len(prompt)] = prompt
        self.length = len(prompt)

    def append(self, token: int) -> None:
        if self.length == len(self._buffer):
            self._buffer = np.concatenate([self._buffer, np.empty_like(self._buffer)])
        self._buffer[self.length] = token
        self.length += 1

    @property
    def tokens(self) -> np.ndarray:
        return self._buffer[: self.length]


class PromptLookupDrafter:
    """Drafts tokens by matching the sequence's last ``ngram_max``..``ngram_min`` tokens against its earlier text,
    longest n-gram first, most recent occurrence first (the closest context).

    How many it drafts adapts per sequence: a step whose drafts were all accepted doubles the next draft (up to
    ``max_tokens``), a rejection cuts it to what was accepted. A copy that runs on (a function rewritten with
    one change) is then verified dozens of tokens a step, while text that only now and then repeats a phrase
    risks a token or two: a verified position costs a fraction of a step, a step of drafts all rejected the same
    fractions added up.
    """

    first_length = 4

    def __init__(self, max_tokens: int, *, ngram_max: int = 4, ngram_min: int = 2) -> None:
        self.max_tokens = max_tokens
        self.ngram_max = ngram_max
        self.ngram_min = ngram_min

    def next_length(self, length: int, drafted: int, accepted: int) -> int:
        if accepted == drafted:
            return min(2 * max(length, drafted), self.max_tokens)
        return max(1, accepted)

    def close(self) -> None:
        pass

    def draft(self, history: np.ndarray, limit: int) -> list[int]:
        """The tokens that followed the latest earlier occurrence of the history's tail, at most ``limit``."""
        limit = min(limit, self.max_tokens)
        if limit <= 0:
            return []
        for n in range(self.ngram_max, self.ngram_min - 1, -1):
            if len(history) <= n:
                continue
            tail = history[-n:]
            # Candidate starts: where the tail's last token occurs, early enough to have a token after the match.
            ends = np.flatnonzero(history[n - 1: -1] == tail[-1])
            if ends.size == 0:
                continue
            windows = sliding_window_view(history[:-1], n)[ends]
            hits = ends[(windows == tail).all(axis=1)]
            if hits.size:
                start = int(hits[-1]) + n
                return history[start: start + limit].tolist()
        return []
