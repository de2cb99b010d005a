"""The batch's KV cache: one array per layer and key/value, rows = sequences of different lengths.

Rows share one tensor by padding, and the attention mask tells the graph which columns are real.
Which side is padded depends on the graph:

- optimum's graphs take ``position_ids`` and a full mask, so rows are **left**-padded: every row's
  newest token sits in the last column and the graph's own concat appends the next one there.
- fused graphs (``GroupQueryAttention``) read each row's length from the mask's sum and write the new
  key/value at that offset, so rows are **right**-padded: real tokens first, padding after.

Rows join (after their prefill) and leave (when finished) between decode steps; each costs one copy
of the cache, while a decode step itself costs none on our side (the graph returns the grown cache).
Under IOBinding the arrays are device OrtValues between steps; a join or leave brings them to the host.

With ``shared`` (fused graphs on the CPU, or at fp16 on CUDA) the arrays are buffers with spare columns,
bound as both the past and the present of a step: GroupQueryAttention then writes each row's new
key/value in place instead of copying the whole cache into a new present every step. Buffers grow by
doubling; on a GPU they live on the device and come to the host only to join, leave or grow.
"""

from __future__ import annotations

import mmap
from typing import Any

import numpy as np


def to_host(array: Any) -> np.ndarray:
    """A cache tensor as numpy: under IOBinding on a GPU the decoder hands back device OrtValues."""
    return array if isinstance(array, np.ndarray) else array.numpy()


def _columns(array: Any) -> int:
    shape = array.shape
    return int((shape() if callable(shape) else shape)[2])  # OrtValue.shape is a method


def _small_pages(shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
    """A zeroed array in memory of its own, mapped in 4 KB pages that the kernel fills on first touch. numpy
    asks for huge pages above 4 MB, and a cache buffer is written sparsely (each row up to its length, the rest
    is padding): every 2 MB page that a row's few columns touch was zeroed whole. A 1.8k-token row joining four
    short ones touched 457 MB that way in 0.57 s, a stall for every stream; in 4 KB pages it takes 37 ms (and
    writing the padding's zeros ourselves, as before, cost a copy of the whole buffer). Filled whole (five
    1.8k-token rows grown to 2,250 columns), fresh small pages take 260-290 ms: slower than memory that malloc
    happens to recycle (68 ms), far faster than fresh huge pages (870 ms): the same cost every time, never the
    worst (this machine, a VM). Unmapped when freed."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if size == 0:
        return np.empty(shape, dtype=dtype)
    return np.frombuffer(mmap.mmap(-1, size), dtype=dtype).reshape(shape)


class BatchCache:
    def __init__(self, *, right_padded: bool = False, shared: bool = False) -> None:
        self.right_padded = right_padded
        self.shared = shared and right_padded
        self.past: list[Any] = []  # np.ndarray, or OrtValue on a device (see runtime.decoder)
        self.lengths = np.zeros(0, dtype=np.int64)  # real tokens per row

    @property
    def rows(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def width(self) -> int:
        if self.shared:  # buffers have spare columns; right padding makes the longest row the width
            return int(self.lengths.max()) if self.rows else 0
        return _columns(self.past[0]) if self.past else 0

    def allocated_tokens(self) -> int:
        """Token slots the cache's arrays hold: rows x columns, padding and spare columns included."""
        return self.rows * _columns(self.past[0]) if self.past and self.rows else 0

    def join(self, present: list[Any], lengths: Any, rows: list[int] | None = None) -> None:
        """Append prefilled rows, laid out on this cache's padding side, with ``lengths`` real tokens each.

        ``rows`` picks (and repeats, for n > 1 choices) rows of ``present``; None takes them all as they are.
        """
        if rows is not None:
            index = np.asarray(rows)
            present = [to_host(p)[index] for p in present]
        new_len = _columns(present[0])
        new_lengths = np.asarray(lengths, dtype=np.int64)
        if self.rows == 0:
            self.past, self.lengths = list(present), new_lengths
            return
        width = max(self.width, new_len)
        # Shared buffers get room to decode into now (growing them at the next step would copy them again), but
        # not much: every row pays the longest row's width, and a long prompt joining short rows is common.
        columns = width + max(64, width // 8) if self.shared else width
        self.past = [self._stack(to_host(old)[:, :, : self.width], to_host(new), columns)
                     for old, new in zip(self.past, present, strict=True)]
        self.lengths = np.concatenate([self.lengths, new_lengths])

    def keep(self, rows: list[int]) -> None:
        """Drop every row not in ``rows``, then the columns that are padding in every remaining row."""
        if len(rows) == self.rows:
            return
        if not rows:
            self.past, self.lengths = [], np.zeros(0, dtype=np.int64)
            return
        index = np.asarray(rows)
        self.lengths = self.lengths[index]
        width = int(self.lengths.max())
        cut = slice(0, width) if self.right_padded else slice(self.width - width, self.width)
        self.past = [np.ascontiguousarray(to_host(p)[index, :, cut, :]) for p in self.past]

    def row(self, row: int) -> list[np.ndarray]:
        """One row's keys and values, its real columns only: ``[heads, length, head_dim]`` per tensor."""
        length = int(self.lengths[row])
        cut = slice(0, length) if self.right_padded else slice(self.width - length, self.width)
        return [to_host(p)[row, :, cut, :] for p in self.past]

    def next_mask(self, new: int = 1) -> np.ndarray:
        """The attention mask for a decode step: each row's cache plus the ``new`` tokens being fed (more than
        one when drafted tokens are verified)."""
        width = self.width + new
        columns = np.arange(width)
        if self.right_padded:
            return (columns[None, :] < (self.lengths + new)[:, None]).astype(np.int64)
        return (columns[None, :] >= (width - self.lengths - new)[:, None]).astype(np.int64)

    def next_past(self, new: int = 1) -> list[Any]:
        """The past for the next decode step; in shared mode with room for its ``new`` tokens in every row."""
        if self.shared:
            needed, have = self.width + new, _columns(self.past[0])
            if have < needed:
                grown = max(needed, have + max(64, have // 4))
                self.past = [self._stack(to_host(p), None, grown) for p in self.past]
        return self.past

    def step(self, present: list[Any], advance: np.ndarray | None = None) -> None:
        """After a decode step every row grew by one real token, or by ``advance`` tokens per row where drafted
        tokens were verified: adopt the graph's output as the cache (in shared mode the buffers it wrote into:
        the same arrays on the CPU, their device copies on a GPU). Keys and values the graph wrote for
        rejected drafts lie past a row's length, where the mask hides them and the next step overwrites them;
        that needs shared buffers, the only mode in which a step may advance rows by other than one."""
        self.past = present
        self.lengths = self.lengths + (1 if advance is None else advance)

    def _stack(self, old: np.ndarray, new: np.ndarray | None, columns: int) -> np.ndarray:
        """``old``'s rows, then ``new``'s, in arrays of ``columns`` columns padded on this cache's side. Only the
        real columns are written, once: the padding is the fresh mapping's zeros (``_small_pages``), which graphs
        that mask padding (optimum's) need, and which GroupQueryAttention never reads."""
        parts = [old] if new is None else [old, new]
        out = _small_pages((sum(p.shape[0] for p in parts), old.shape[1], columns, old.shape[3]), old.dtype)
        row = 0
        for part in parts:
            width = part.shape[2]
            real = slice(0, width) if self.right_padded else slice(columns - width, columns)
            out[row:row + part.shape[0], :, real] = part
            row += part.shape[0]
        return out
