"""Prefix caching: the KV of prompts and of finished answers kept after their requests, reused token-exactly by
later prompts that start the same way (a system prompt, tool definitions, a chat's history with the answer the
model gave, few-shot examples). Answers only where one graph reads prompts and decodes (see
GenerationEngine._retain).

The store holds fixed-size blocks of ``block`` tokens, as vLLM's automatic prefix caching does: a block is
found by its tokens and its parent block (the whole prefix before it), so two prompts share exactly the blocks
of their common block-aligned prefix, whoever sent them. Blocks live on the host (numpy) in one LRU under a
byte budget; a block is never more recent than its parent (a chain is touched leaf first, its root last), so
eviction takes leaves before the prefixes they extend and never strands a reachable block behind an evicted one.

A prompt's last tokens, short of a block, are kept too, with the logits its last token gave (an "end"): an
identical prompt then computes nothing, its first token sampled from those logits (the same bits its first reading
gave), and joins the decoding batch at once. llama.cpp's server and vLLM read such a prompt's last token again, one
token each, which batches with the decode steps; here it could not: a one-token step on a past rounds otherwise than
the prompt it ends (see ``match``), and ONNX Runtime's GroupQueryAttention reads a two-token rest for one row only,
so eight repeated prompts arriving together were read one after another (Qwen2.5-Coder-0.5B, 2 cores: ~40 ms each).
Repeats are common: regenerated answers, retries, the same prompt sampled again, evaluation harnesses. An end is
a leaf of its prefix's chain, so it goes before the blocks it extends.

Beside the blocks the store may hold one sequence's KV buffers as they were when it left an emptied batch (see
``hold``), as llama.cpp's server keeps a slot's cache: the next prompt that starts with that sequence's prompt
continues in them, without copying its prefix out of the blocks (20 ms for 3.5k tokens of SmolLM2).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

_ROOT = 0  # the parent key of a prompt's first block


@dataclass
class _Block:
    parent: int
    tokens: tuple[int, ...]
    kv: list[np.ndarray]  # per cache tensor (layer key, layer value, ...): [heads, block, head_dim]
    nbytes: int
    logits: np.ndarray | None = None  # an end's (fewer tokens than a block, maybe none): its last token's


class PrefixMatch(NamedTuple):
    tokens: int  # prompt tokens whose KV ``past`` holds
    past: list[np.ndarray] | None
    logits: np.ndarray | None = None  # the prompt was cached whole: its last token's logits, nothing to compute


@dataclass
class PrefixStats:
    queries: int = 0  # prompts looked up
    hits: int = 0  # prompts that reused at least one block
    cached_tokens: int = 0  # prompt tokens reused instead of computed
    whole_hits: int = 0  # of the hits, prompts cached whole (with their logits): nothing computed
    stored_blocks: int = 0
    evicted_blocks: int = 0


class PrefixCache:
    def __init__(self, budget_bytes: int, *, block: int = 16) -> None:
        self.budget_bytes = budget_bytes
        self.block = block
        self.used_bytes = 0
        self.stats = PrefixStats()
        self._blocks: OrderedDict[int, _Block] = OrderedDict()
        self._held: tuple[list[int], list[np.ndarray]] | None = None  # a prompt, and buffers that begin with its KV

    @property
    def blocks(self) -> int:
        return len(self._blocks)

    def match(self, ids: list[int], columns: int | None = None) -> PrefixMatch:
        """The longest cached prefix of ``ids`` and its KV as a batch of one (``[1, heads, columns, head_dim]`` per
        tensor, the prefix's keys and values in the first ``tokens`` columns): the whole prompt, with its last
        token's logits, where it was read before; else the longest run of blocks that leaves at least two tokens
        to compute (the last one's logits are the next token's). ``columns`` (at least ``len(ids)``) leaves room
        for the rest of the prompt and the answer, unwritten: a graph that writes its keys and values in place
        then computes the remainder into these arrays (None: exactly ``tokens``).
        Two, because a one-token step takes other kernels than a prompt's (attention's single-query path,
        MatMulNBits' one-row one), which round otherwise: a prompt's last tokens must not be computed one way
        with the cache and another without it."""
        self.stats.queries += 1
        chain: list[_Block] = []
        keys: list[int] = []
        parent = _ROOT
        for _, up, tokens, key in self._chain(ids, len(ids) // self.block):
            block = self._blocks.get(key)
            if not self._is(block, up, tokens):
                break
            chain.append(block)  # type: ignore[arg-type]
            keys.append(key)
            parent = key
        end = None
        if len(chain) == len(ids) // self.block:  # every full block: the prompt's end, if it was read whole
            end_key, end_tokens = self._end(parent, ids)
            end = self._blocks.get(end_key)
            if self._is(end, parent, end_tokens) and end.logits is not None:  # type: ignore[union-attr]
                chain.append(end)  # type: ignore[arg-type]
                keys.append(end_key)
            else:
                end = None
        if end is None:
            del chain[(len(ids) - 2) // self.block:], keys[(len(ids) - 2) // self.block:]
        held, self._held = self._held, None  # taken or let go of: it would only hold memory from now on
        if not chain:
            return PrefixMatch(0, None)
        self._touch(keys)
        self.stats.hits += 1
        self.stats.whole_hits += end is not None
        length = len(ids) if end is not None else len(chain) * self.block
        self.stats.cached_tokens += length
        logits = None if end is None else end.logits
        if held is not None and columns is not None and length <= len(held[0]) and \
                held[0][:length] == ids[:length] and held[1][0].shape[2] >= columns:
            return PrefixMatch(length, held[1], logits)
        past = []
        for i, first in enumerate(chain[0].kv):
            heads, _, head_dim = first.shape
            tensor = np.empty((1, heads, columns or length, head_dim), dtype=first.dtype)
            np.concatenate([block.kv[i] for block in chain], axis=1, out=tensor[0, :, :length])
            past.append(tensor)
        return PrefixMatch(length, past, logits)

    @staticmethod
    def _is(block: _Block | None, parent: int, tokens: tuple[int, ...]) -> bool:
        """Whether the block found under a key is the one asked for: a hash collision is a miss."""
        return block is not None and block.parent == parent and block.tokens == tokens

    def _end(self, parent: int, ids: list[int]) -> tuple[int, tuple[int, ...]]:
        """The key and tokens of ``ids``'s end: the tokens after its last full block, whose key is ``parent``."""
        tokens = tuple(ids[len(ids) // self.block * self.block:])
        return hash((parent, tokens, "end")), tokens

    def store(self, ids: list[int], kv: list[np.ndarray], copies: dict[int, list[np.ndarray]] | None = None,
              logits: np.ndarray | None = None) -> None:
        """Keep the KV of ``ids``'s full blocks: ``kv`` holds, per cache tensor, ``[heads, tokens, head_dim]``
        whose first ``len(ids)`` columns are those tokens'. Blocks already held are only touched. ``copies``: the
        blocks ``copy_blocks`` made of the same ``ids`` and ``kv``, where they were copied ahead of time.
        ``logits``: those ``ids``'s last token gave, read as a whole prompt; its end is kept with them."""
        keys: list[int] = []
        parent = _ROOT
        for start, up, tokens, key in self._chain(ids, len(ids) // self.block):
            if key not in self._blocks and not self._add(key, _Block(
                    up, tokens, (copies or {}).get(key) or self._copy(kv, start, self.block), 0)):
                return
            keys.append(key)
            parent = key
        if logits is not None:
            key, tokens = self._end(parent, ids)
            if key not in self._blocks and not self._add(key, _Block(
                    parent, tokens, self._copy(kv, len(ids) - len(tokens), len(tokens)), 0, np.array(logits))):
                return
            keys.append(key)
        self._touch(keys)
        self._evict()

    def _add(self, key: int, block: _Block) -> bool:
        """File ``block``, unless it alone is over the budget."""
        block.nbytes = sum(k.nbytes for k in block.kv) + (0 if block.logits is None else block.logits.nbytes)
        if block.nbytes > self.budget_bytes:
            return False
        self._blocks[key] = block
        self.used_bytes += block.nbytes
        self.stats.stored_blocks += 1
        return True

    def copy_blocks(self, ids: list[int], kv: list[np.ndarray]) -> dict[int, list[np.ndarray]]:
        """The copies ``store`` would make of ``ids``'s blocks not held yet, by key: made by the prefill thread,
        beside the decode steps, for a long prompt it read, so that storing it on the engine thread only files
        them (copying 2k tokens of SmolLM2's KV into fresh blocks took 40-180 ms there, a stall for every
        stream). It reads the store without a lock: a block stored meanwhile is only copied twice."""
        return {key: self._copy(kv, start, self.block)
                for start, _, _, key in self._chain(ids, len(ids) // self.block) if key not in self._blocks}

    @staticmethod
    def _copy(kv: list[np.ndarray], start: int, tokens: int) -> list[np.ndarray]:
        """``tokens`` columns of ``kv`` from ``start``, in arrays of their own (not views that would keep the whole
        prompt's buffers alive)."""
        return [np.array(tensor[:, start:start + tokens, :]) for tensor in kv]

    def hold(self, prompt: list[int], buffers: list[np.ndarray]) -> None:
        """Keep ``buffers`` (``[1, heads, columns, head_dim]`` per tensor, written in place) until the next
        ``match``, which hands them over if its prefix lies within ``prompt``, whose keys and values they begin
        with. Only a prompt's: where an answer was decoded, its columns hold a decode step's rounding, which the
        blocks for the same tokens may not (see GenerationEngine._retain). The memory is the batch's, kept a
        moment longer; it counts against no budget, and the next admission lets go of it."""
        self._held = (list(prompt), buffers)

    def _chain(self, ids: list[int], blocks: int) -> Iterator[tuple[int, int, tuple[int, ...], int]]:
        """``(start, parent key, tokens, key)`` of the first ``blocks`` blocks of ``ids``."""
        parent = _ROOT
        for start in range(0, blocks * self.block, self.block):
            tokens = tuple(ids[start:start + self.block])
            key = hash((parent, tokens))
            yield start, parent, tokens, key
            parent = key

    def _touch(self, keys: list[int]) -> None:
        """Mark a chain as just used, leaf first, so that no block becomes more recent than its parent."""
        for key in reversed(keys):
            self._blocks.move_to_end(key)

    def _evict(self) -> None:
        while self.used_bytes > self.budget_bytes and self._blocks:
            _, block = self._blocks.popitem(last=False)
            self.used_bytes -= block.nbytes
            self.stats.evicted_blocks += 1
