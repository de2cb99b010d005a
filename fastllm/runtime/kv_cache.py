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

from typing import Any

import numpy as np


def to_host(array: Any) -> np.ndarray:
    """A cache tensor as numpy: under IOBinding on a GPU the decoder hands back device OrtValues."""
    return array if isinstance(array, np.ndarray) else array.numpy()


def _columns(array: Any) -> int:
    shape = array.shape
    return int((shape() if callable(shape) else shape)[2])  # OrtValue.shape is a method


def small_pages_only() -> None:
    """Stop numpy asking for huge pages (``madvise``) for arrays above 4 MB, for the whole process: the server
    calls it at start. KV buffers are written sparsely: each row up to its length, the rest padding that
    GroupQueryAttention never reads. Every 2 MB page a row's few columns touch was zeroed whole: a 1.8k-token row
    joining four short ones made 457 MB of fresh pages in 0.57 s, a stall for every stream; with 4 KB pages,
    38 ms. A buffer filled whole (grown for more steps) costs about the same either way when malloc recycles
    the memory (68 ms for five 1.8k-token rows), and 180 ms against 870 ms when it is fresh (this machine, a
    VM). numpy reads NUMPY_MADVISE_HUGEPAGE only at import; this is the switch it uses itself."""
    try:
        from numpy._core.multiarray import _set_madvise_hugepage
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _set_madvise_hugepage  # type: ignore[no-redef]
    _set_madvise_hugepage(False)


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

    def join(self, present: list[Any], lengths: Any, rows: list[int] | None = None,
             into: list[np.ndarray] | None = None) -> None:
        """Append prefilled rows, laid out on this cache's padding side, with ``lengths`` real tokens each.

        ``rows`` picks (and repeats, for n > 1 choices) rows of ``present``; None takes them all as they are.
        ``into``: arrays from ``faulted_join``, used where they still fit.
        """
        if rows is not None:
            index = np.asarray(rows)
            present = [to_host(p)[index] for p in present]
        new_lengths = np.asarray(lengths, dtype=np.int64)
        # shared buffers may come with spare columns (a prompt computed in place): only the real ones are carried
        new_len = int(new_lengths.max()) if self.shared else _columns(present[0])
        if self.rows == 0:
            self.past, self.lengths = list(present), new_lengths
            return
        width = max(self.width, new_len)
        columns = self._join_columns(width) if self.shared else width
        fits = into is not None and into[0].shape[0] == self.rows + len(new_lengths) and into[0].shape[2] >= columns
        self.past = [self._stack(to_host(old)[:, :, : self.width], to_host(new)[:, :, :new_len], columns,
                                 out=into[layer] if fits else None)  # type: ignore[index]
                     for layer, (old, new) in enumerate(zip(self.past, present, strict=True))]
        self.lengths = np.concatenate([self.lengths, new_lengths])

    @staticmethod
    def _join_columns(width: int) -> int:
        """Shared buffers get room to decode into at a join (growing them at the next step would copy them again),
        but not much: every row pays the longest row's width, and a long prompt joining short rows is common."""
        return width + max(64, width // 8)

    def faulted_join(self, present: list[np.ndarray], new_rows: int, new_length: int) -> list[np.ndarray] | None:
        """Arrays for ``join`` to copy ``new_rows`` rows of up to ``new_length`` tokens and this cache's rows into,
        their pages made (a write every 4 KB) ahead of time: by the prefill thread, beside the decode steps, after
        it read a long prompt. Made at the join, on the engine thread, fresh pages stalled every stream: 340 ms
        for a 2k-token row joining four short ones (SmolLM2, a VM), where recycled memory took 65 ms. The cache's
        size is read here without a lock; ``join`` uses the arrays only if they still fit."""
        lengths = self.lengths  # one snapshot: the engine thread replaces it as rows step, join and leave
        if not self.shared or not len(lengths):
            return None
        columns = self._join_columns(max(int(lengths.max()), new_length))
        arrays = []
        for like in present:
            array = np.empty((len(lengths) + new_rows, like.shape[1], columns, like.shape[3]), dtype=like.dtype)
            array.reshape(-1)[:: max(1, 4096 // array.itemsize)] = 0
            arrays.append(array)
        return arrays

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

    def _stack(self, old: np.ndarray, new: np.ndarray | None, columns: int,
               out: np.ndarray | None = None) -> np.ndarray:
        """``old``'s rows, then ``new``'s, in arrays of ``columns`` columns (``out``'s, where given) padded on this
        cache's side, written in one pass: every byte once, in order (np.pad and np.concatenate each wrote the lot
        again). Shared buffers leave their padding unwritten: GroupQueryAttention reads each row up to its own
        length (past it lie rejected drafts too), and unwritten pages cost nothing (see ``small_pages_only``);
        graphs that mask padding (optimum's) need zeros there, which garbage would turn into NaN through the zero
        weights."""
        parts = [old] if new is None else [old, new]
        if out is None:
            out = np.empty((sum(p.shape[0] for p in parts), old.shape[1], columns, old.shape[3]), dtype=old.dtype)
        columns = out.shape[2]
        row = 0
        for part in parts:
            width = part.shape[2]
            real, pad = (slice(0, width), slice(width, columns)) if self.right_padded else \
                (slice(columns - width, columns), slice(0, columns - width))
            block = out[row:row + part.shape[0]]
            block[:, :, real] = part
            if not self.shared:
                block[:, :, pad] = 0
            row += part.shape[0]
        return out
