"""The batch's KV cache: one array per layer and key/value, rows = sequences, left-padded.

Rows of different lengths share one tensor by left padding; the attention mask hides the padding.
Rows join (after their prefill) and leave (when finished) between decode steps; each costs one copy
of the cache, while a decode step itself costs none on our side (the graph returns the grown cache).
"""

from __future__ import annotations

import numpy as np


class BatchCache:
    def __init__(self) -> None:
        self.past: list[np.ndarray] = []
        self.mask = np.zeros((0, 0), dtype=np.int64)

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def join(self, present: list[np.ndarray], copies: int) -> None:
        """Append ``copies`` rows holding one prefilled sequence (``present`` has batch 1)."""
        new_len = present[0].shape[2]
        new_mask = np.ones((copies, new_len), dtype=np.int64)
        new_past = [np.repeat(p, copies, axis=0) if copies > 1 else p for p in present]
        if self.rows == 0:
            self.past, self.mask = new_past, new_mask
            return
        width = max(self.length, new_len)
        self.past = [
            np.concatenate([_left_pad(old, width), _left_pad(new, width)], axis=0)
            for old, new in zip(self.past, new_past, strict=True)
        ]
        self.mask = np.concatenate([_left_pad_mask(self.mask, width), _left_pad_mask(new_mask, width)])

    def keep(self, rows: list[int]) -> None:
        """Drop every row not in ``rows``, then the columns that are padding in every remaining row."""
        if len(rows) == self.rows:
            return
        if not rows:
            self.past, self.mask = [], np.zeros((0, 0), dtype=np.int64)
            return
        index = np.asarray(rows)
        mask = self.mask[index]
        start = int(np.argmax(mask.any(axis=0)))
        self.mask = np.ascontiguousarray(mask[:, start:])
        self.past = [np.ascontiguousarray(p[index, :, start:, :]) for p in self.past]

    def step(self, present: list[np.ndarray], mask: np.ndarray) -> None:
        """Adopt the graph's output after a decode step run with ``mask`` (from ``next_mask``)."""
        self.past, self.mask = present, mask

    def next_mask(self) -> np.ndarray:
        """The attention mask for a decode step: the cache plus the token being fed."""
        return np.concatenate([self.mask, np.ones((self.rows, 1), dtype=np.int64)], axis=1)


def _left_pad(array: np.ndarray, width: int) -> np.ndarray:
    missing = width - array.shape[2]
    if missing == 0:
        return array
    return np.pad(array, ((0, 0), (0, 0), (missing, 0), (0, 0)))


def _left_pad_mask(mask: np.ndarray, width: int) -> np.ndarray:
    missing = width - mask.shape[1]
    return mask if missing == 0 else np.pad(mask, ((0, 0), (missing, 0)))
