"""Continuous batching: one engine thread runs the model, asyncio handlers only wait on queues.

Each loop iteration (1) admits waiting requests, prefilling their prompts within a token budget
(several prompts in one run where the graph allows; a prompt whose start is in the prefix cache computes
only the rest, on the cached KV; a long one arriving while others decode is read beside their steps, in a
prefill thread, on the CPU, or else in chunks between them),
(2) runs one decode step for every running sequence together, each row's next token followed by the tokens
the drafter guessed for it, if any (speculative decoding: the multi-token step chunked prefill uses too),
(3) samples each row through its logits processors (penalties, bias, and the grammar mask of a constrained row,
so constrained and free rows share the batch), position by position while the drafts agree, detokenizes and
checks stops per sequence, and (4) drops finished or cancelled sequences
from the batch. Requests join and leave between steps, so a long generation never holds back a short
one. ``session.run`` releases the GIL, so the event loop keeps serving while the model computes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fastllm.errors import EngineError, InvalidRequestError, OverloadedError, RequestError
from fastllm.runtime.decoder import Decoder, StepOutput
from fastllm.runtime.detokenize import IncrementalDetokenizer
from fastllm.runtime.grammar import CompiledGrammar
from fastllm.runtime.kv_cache import BatchCache, to_host
from fastllm.runtime.prefix_cache import PrefixCache, PrefixMatch
from fastllm.runtime.sampling import Sampler, SamplingParams, TokenLogprob
from fastllm.runtime.speculation import Drafter, TokenHistory
from fastllm.tokenization.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# Rows above which a decode step does not verify drafts (see GenerationEngine._drafts). ONNX Runtime's
# GroupQueryAttention takes several new tokens on a past for one row only; and on a full batch a decode step is
# no longer bound by reading the weights, so verifying drafts would cost every row real compute.
SPECULATION_MAX_ROWS = 1
# The fewest prompt tokens a chunk reads, however short the running rows' steps: below this a chunk's fixed
# cost dominates and a long prompt would take many times its solo prefill.
MIN_CHUNK_TOKENS = 8
# What a prompt read beside the decode steps leaves to the engine thread: the prompt's last tokens, read with the
# first token's sampling as any prompt's rest after a cached prefix (two, so that no step reads one token on a past).
BESIDE_TAIL = 2


def greedy_tokens(decoder: Decoder, prompt: list[int]) -> Iterator[int]:
    """Greedy tokens of one prompt, until the caller stops: the engine's decoder and cache code (shared KV
    buffers included) without its thread. Export validation checks exports with it; the engine benchmark
    times it beside the engine."""
    out = decoder.prefill([prompt])
    cache = BatchCache(right_padded=decoder.right_padded, shared=decoder.shares_kv)
    cache.join(out.present, [len(prompt)])
    position = np.asarray([[len(prompt)]], dtype=np.int64)
    try:
        while True:
            token = int(np.argmax(out.logits[0]))
            yield token
            out = decoder.forward(np.asarray([[token]], dtype=np.int64), cache.next_mask(), position,
                                  cache.next_past(), in_place=cache.shared)
            cache.step(out.present)
            position = position + 1
    finally:
        decoder.release()


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    stop: list[str] = field(default_factory=list)
    n: int = 1
    ignore_eos: bool = False
    # Structured outputs and tool calls: each choice follows its own copy of this grammar.
    grammar: CompiledGrammar | None = None
    # False where the text must keep special tokens (a tool-call syntax that opens with one).
    skip_special_tokens: bool = True
    # False opts this request out of speculative decoding where the model has it on.
    speculative: bool = True


@dataclass
class Delta:
    """What one choice produced in one step; ``finish_reason`` is set on its last delta."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    cached_tokens: int = 0  # on a choice's first delta: prompt tokens whose KV came from the prefix cache


@dataclass
class _Sequence:
    request: _Pending
    index: int
    sampler: Sampler
    detok: IncrementalDetokenizer
    position: int
    next_token: int = -1
    generated: int = 0
    finish_reason: str | None = None
    output: list[int] = field(default_factory=list)  # the tokens sampled so far
    history: TokenHistory | None = None  # prompt and output, where a drafter looks for the next tokens
    draft_length: int = 0  # how many tokens the drafter may propose next (it adapts to what was accepted)


class _Pending:
    """A submitted request as the engine thread sees it, and its channel back to the event loop."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> None:
        self.request = request
        self.loop = loop
        self.queue: asyncio.Queue[list[Delta] | BaseException] = asyncio.Queue()
        self.cancelled = False
        self.submitted = time.perf_counter()
        self.unfinished = request.n
        # (tokens, KV) of the prompt's start already computed: found in the prefix cache, then grown by chunks.
        self.reused: tuple[int, list[Any] | None] | None = None
        self.cached_tokens = 0  # of those, the ones the prefix cache gave
        # The prompt was cached whole: its last token's logits, from which its first token is sampled (no run).
        self.logits: np.ndarray | None = None
        # A prompt read in chunks on graphs that share KV buffers: buffers for the whole prompt, written in place.
        self.buffers: list[Any] | None = None
        # Read beside the decode steps: made there too, the batch's arrays to join (faulted in) and the blocks of
        # the prefix store (copied), so that the engine thread only files them.
        self.join_into: list[np.ndarray] | None = None
        self.block_copies: dict[int, list[np.ndarray]] | None = None

    @property
    def chunking(self) -> bool:
        """Whether chunks of this prompt have been read (beyond what the prefix cache gave): once begun, a long
        prompt goes on in chunks."""
        return self.reused is not None and self.reused[0] > self.cached_tokens

    def send(self, item: list[Delta] | BaseException) -> None:
        """Hand ``item`` to the request's event loop; one that has closed (its app shut down while the engine
        still held the request) has nobody listening, so the item is dropped and the request cancelled."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # "Event loop is closed"
            self.cancelled = True


@dataclass
class EngineStats:
    running: int = 0
    waiting: int = 0
    steps: int = 0
    prefill_runs: int = 0
    prefill_chunks: int = 0  # pieces of long prompts read apart from their last tokens (chunks, or beside steps)
    prefill_beside: int = 0  # of those, prompts read in the prefill thread beside the decode steps
    last_batch_size: int = 0
    int8_steps: int = 0  # decode steps run through the int8 prompt graph (int8_decode_rows)
    drafted_tokens: int = 0  # speculative decoding: tokens proposed by the drafter and verified
    accepted_tokens: int = 0  # of those, the ones the model agreed with


class GenerationEngine:
    def __init__(self, decoder: Decoder, tokenizer: Tokenizer, *, eos_token_ids: list[int],
                 max_batch_size: int, max_prefill_tokens: int, max_queue: int, name: str = "",
                 prefix_cache: PrefixCache | None = None, prefill_chunk: int = 256, prefill_stall_ratio: float = 0.0,
                 kv_budget_bytes: int | None = None, drafter: Drafter | None = None,
                 int8_decode_rows: int = 0) -> None:
        self.decoder = decoder
        # Decode steps of this many rows or more run through the export's int8 prompt graph (0: never)
        self.int8_decode_rows = int8_decode_rows if decoder.has_prefill_graph else 0
        self.prefix_cache = prefix_cache
        self.tokenizer = tokenizer
        self.eos = frozenset(eos_token_ids)
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.prefill_stall_ratio = prefill_stall_ratio
        # Measured as the engine runs (seconds): its last decode step's, and what a chunk costs per prompt token.
        self._step_seconds: float | None = None
        self._chunk_seconds_per_token: float | None = None
        self.kv_budget_bytes = kv_budget_bytes
        self.kv_token_bytes = decoder.kv_token_bytes
        self.name = name
        self.stats = EngineStats()
        self._waiting: deque[_Pending] = deque()
        self._running: list[_Sequence] = []
        self._cache = BatchCache(right_padded=decoder.right_padded, shared=decoder.shares_kv)
        if drafter is not None and not self._can_verify(name):
            drafter.close()  # a draft model's session is let go of at once, not when the engine closes
            drafter = None
        self.drafter = drafter
        self._wake = threading.Condition()
        self._grammar_pool = ThreadPoolExecutor(1, thread_name_prefix=f"grammar-{name}")
        # A long prompt that arrives while others decode is read in this thread, beside their steps, where the
        # decoder has sessions for that (see _read_beside); elsewhere in chunks between them.
        self._beside: ThreadPoolExecutor | None = None
        if decoder.beside_sessions is not None:
            self._beside = ThreadPoolExecutor(1, thread_name_prefix=f"prefill-{name}")
        self._read: tuple[_Pending, int, Future[StepOutput]] | None = None  # the prompt read there, up to where
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=f"engine-{name}", daemon=True)
        self._thread.start()

    # ---- event-loop side -------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[list[Delta]]:
        """Yield the deltas of each step until every choice has finished; cancel on early exit."""
        pending = _Pending(request, asyncio.get_running_loop())
        with self._wake:
            if self._stopping:
                raise OverloadedError("the server is shutting down", status=503)
            if len(self._waiting) >= self.max_queue + self.max_batch_size:
                raise OverloadedError(
                    f"{len(self._waiting)} requests are already waiting for {self.name}; retry shortly"
                )
            self._waiting.append(pending)
            self._wake.notify()
        try:
            while True:
                item = await pending.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if any(d.finish_reason for d in item):
                    pending.unfinished -= sum(1 for d in item if d.finish_reason)
                    if pending.unfinished <= 0:
                        return
        finally:
            pending.cancelled = True  # no-op when finished; frees the slots of a vanished client

    def close(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=10)
        self._grammar_pool.shutdown(wait=False)
        if self._beside is not None:
            self._beside.shutdown(wait=True)
        if self.drafter is not None:
            self.drafter.close()

    # ---- engine thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._waiting and not self._running and not self._read_done() and \
                        (not self._stopping or self._read is not None):  # a read in flight is waited for, even then
                    self._wake.wait()
                if self._stopping and not self._running and not self._waiting and self._read is None:
                    return
            try:
                self._iteration()
            except Exception as exc:  # a fault in the batch: fail its requests, keep the engine alive
                log.exception("engine step failed for %s", self.name)
                error = EngineError("the model failed while generating this response")
                for pending in {id(s.request): s.request for s in self._running}.values():
                    pending.send(error)
                self._running = []
                self._cache = BatchCache(right_padded=self.decoder.right_padded, shared=self.decoder.shares_kv)
                del exc

    def _iteration(self) -> None:
        self._drop_cancelled()
        self._admit()
        if self._running:
            self._decode_step()
        self._update_stats()

    def _update_stats(self) -> None:
        """Counts are updated before results are sent, so a finished client never sees itself running."""
        self.stats.running = len(self._running)
        self.stats.waiting = len(self._waiting) + (self._read is not None)

    def _drop_cancelled(self) -> None:
        with self._wake:
            if any(p.cancelled and p.buffers is not None for p in self._waiting):
                self.decoder.release("prefill")  # a prompt given up on while read in chunks
            self._waiting = deque(p for p in self._waiting if not p.cancelled)
        if any(s.request.cancelled for s in self._running):
            self._retain([s for s in self._running if not s.request.cancelled])

    def _admit(self) -> None:
        """Prefill waiting requests between decode steps, within the batch's free slots and token budget.

        Graphs that batch prompts (right-padded ones) prefill a whole group in one run, where the budget
        counts padded tokens; others prefill one prompt per run. A running batch waits for at most one
        budget's worth of prefill per step, so admitting never stalls its decoding for long; and a prompt
        longer than ``prefill_chunk`` arriving while others decode is read beside their steps, in a thread of its
        own, on the CPU (``prefill_beside``); otherwise one chunk per step (chunked prefill: each chunk a
        multi-token step on the KV of the chunks before it, as a cached prefix is).
        """
        self._collect_read()
        budget = self.max_prefill_tokens
        chunk_tokens = self._chunk_tokens()
        while True:
            group: list[_Pending] = []
            chunked: _Pending | None = None
            with self._wake:
                slots = self.max_batch_size - len(self._running) - (self._read[0].request.n if self._read else 0)
                longest = 0
                while self._waiting:
                    pending = self._waiting[0]
                    if pending.reused is None:  # the prefix store is consulted once, at the head of the queue
                        match = self._reused(pending.request.prompt_ids)
                        pending.reused, pending.cached_tokens, pending.logits = match[:2], match.tokens, match.logits
                        if self.decoder.shares_kv:  # the cached prefix, already in buffers with room for the rest
                            pending.buffers = match.past
                    whole = pending.logits is not None  # nothing to compute: such prompts join together
                    if group and (whole != (group[0].logits is not None) or (pending.reused[0] and not whole)):
                        break  # prompts cached whole join together; one that continues a cached prefix goes alone
                    ids = len(pending.request.prompt_ids) - pending.reused[0]
                    rows_after = sum(p.request.n for p in group) + pending.request.n
                    longest_prompt = max(len(p.request.prompt_ids) for p in [*group, pending])
                    if not self._kv_fits(rows_after, longest_prompt):
                        if group or self._running:
                            break  # waits until finished rows free their KV
                        self._waiting.popleft()
                        pending.send(self._too_large(longest_prompt, pending.request.n))
                        continue
                    fits = pending.request.n <= slots
                    # Long prompts go in chunks (short ones whole: split, they would take longer and spare the
                    # running rows little); once begun, every chunk is sized to the stall ratio.
                    long = ids > (chunk_tokens if pending.chunking else self.prefill_chunk)
                    if self._running and long and fits:
                        if self._beside is None:
                            chunked = None if group else pending
                        elif self._read is None:  # read beside the decode steps; those behind it go on
                            self._read_beside(self._waiting.popleft())
                            slots -= pending.request.n
                            continue
                        break
                    padded = max(longest, ids) * (len(group) + 1)
                    affordable = padded <= budget or (not group and budget == self.max_prefill_tokens)
                    if not (fits and affordable) and (group or self._running):
                        break
                    group.append(self._waiting.popleft())
                    slots -= pending.request.n
                    longest = max(longest, ids)
                    if not whole and (not self.decoder.batched_prefill or pending.reused[0]):
                        break
            if chunked is not None:
                self._prefill_chunk(chunked, chunk_tokens)
                return
            if not group:
                return
            budget -= longest * len(group)
            self._prefill_group(group)
            if budget <= 0:
                return

    def _prefill_group(self, group: list[_Pending]) -> None:
        """One prefill for the group; if it fails, each prompt alone, so only a faulty one gets the error."""
        try:
            self._prefill(group)
        except Exception:
            if len(group) > 1:
                for pending in group:
                    self._prefill_group([pending])
                return
            log.exception("prefill failed for a request to %s", self.name)
            group[0].send(EngineError("the model failed while reading this prompt"))

    def kv_bytes(self) -> int:
        """Host or device memory the running batch's KV cache holds now (padding and spare columns included)."""
        return self._cache.allocated_tokens() * self.kv_token_bytes

    def _kv_fits(self, new_rows: int, new_length: int) -> bool:
        """Whether ``new_rows`` more rows of up to ``new_length`` tokens join the batch within the KV budget:
        rows share one padded width, so the batch costs rows x its longest row."""
        if self.kv_budget_bytes is None:
            return True
        rows = self._cache.rows + new_rows
        width = max(self._cache.width, new_length) + 1
        return rows * width * self.kv_token_bytes <= self.kv_budget_bytes

    def _too_large(self, length: int, n: int) -> RequestError:
        need = n * (length + 1) * self.kv_token_bytes / 2**20
        return InvalidRequestError(
            f"this request needs {need:.0f} MB of KV cache ({n} x {length} tokens), more than this server's "
            f"kv_budget_mb ({self.kv_budget_bytes / 2**20:.0f} MB) for {self.name}", param="messages",
            code="kv_budget_exceeded")

    def _reused(self, prompt: list[int]) -> PrefixMatch:
        if self.prefix_cache is None:
            return PrefixMatch(0, None)
        return self.prefix_cache.match(prompt, self._room(prompt) if self.decoder.shares_kv else None)

    def _chunk_tokens(self) -> int:
        """How many tokens of a long prompt (one above ``prefill_chunk``) the next chunk reads while others
        decode: ``prefill_chunk``, or with ``prefill_stall_ratio`` as many as keep the running rows' gap between
        tokens (the chunk, then their step) within that many times their step alone, going by the last chunk's
        cost per token (which grows with the prompt's length) and the last step's time. A prompt is read more
        slowly so that the streams already running keep their pace: the trade Sarathi-Serve makes with its
        token budget. Unlike Sarathi, the running rows cannot ride in the chunk's run: ONNX Runtime's CPU
        GroupQueryAttention reads several tokens on a past only for a batch of one. So each chunk pays a run's
        fixed cost, about a decode step's (SmolLM2 int4, 2 cores: a 4-row step 8 ms, an 8-token chunk 14-20 ms),
        and a gap of about three steps is the least that reading a prompt in chunks leaves the running rows."""
        if not self.prefill_stall_ratio or self._step_seconds is None:
            return self.prefill_chunk
        if self._chunk_seconds_per_token is None:
            return MIN_CHUNK_TOKENS  # nothing measured yet: a small first chunk, then as many as fit
        allowed = (self.prefill_stall_ratio - 1) * self._step_seconds / self._chunk_seconds_per_token
        return int(min(self.prefill_chunk, max(MIN_CHUNK_TOKENS, allowed)))

    def _read_beside(self, pending: _Pending) -> None:
        """Read all but the last ``BESIDE_TAIL`` tokens of a long prompt in the prefill thread, while this one goes
        on decoding, each on the decoder's sessions with half the threads (``prefill_beside``). Read between the
        steps instead, each chunk adds its fixed cost, about a step's, to the running rows' gap between tokens (see
        _chunk_tokens); beside them the rows slow only by having half the cores. The full-width sessions would
        share the cores badly: their spinning threads take turns on them (SmolLM2 int4, 2 cores, 4 rows decoding
        while 1,760 tokens are read: steps at p95 48 ms on the full-width sessions, 25 ms on a thread each, 48 ms
        in chunks; 13 ms alone)."""
        end = len(pending.request.prompt_ids) - BESIDE_TAIL
        future = self._beside.submit(self._read_ahead, pending, end)  # type: ignore[union-attr]
        self._read = (pending, end, future)
        future.add_done_callback(lambda _: self._notify())

    def _notify(self) -> None:
        with self._wake:
            self._wake.notify()

    def _read_done(self) -> bool:
        return self._read is not None and self._read[2].done()

    def _collect_read(self) -> None:
        """A prompt read beside the decode steps goes back to the head of the queue with its KV as its reused
        prefix, and is admitted from there as a chunked one is; one given up on meanwhile is dropped."""
        if not self._read_done():
            return
        pending, end, future = self._read  # type: ignore[misc]
        self._read = None
        self.decoder.release("beside")
        error = future.exception()
        if error is not None:
            log.error("reading a prompt failed for a request to %s", self.name, exc_info=error)
            pending.send(EngineError("the model failed while reading this prompt"))
        elif not pending.cancelled:
            self._keep_read(pending, end, future.result())
            self.stats.prefill_beside += 1
            with self._wake:
                self._waiting.appendleft(pending)

    @staticmethod
    def _room(prompt: list[int]) -> int:
        """Columns of the KV buffers a prompt is read into on graphs that write in place: the prompt, and room to
        decode into once an empty batch adopts them (a batch that outgrows its buffers copies them whole)."""
        return len(prompt) + max(64, len(prompt) // 8)

    def _prefill_chunk(self, pending: _Pending, size: int) -> None:
        """The next ``size`` tokens of a long prompt, on the KV of those before; the request stays at the head
        of the queue, with that KV as its reused prefix, until what is left fits a normal prefill."""
        done = pending.reused[0] if pending.reused else 0
        # no one-token last step: see PrefixCache.match
        end = done + min(size, len(pending.request.prompt_ids) - done - 2)
        started = time.perf_counter()
        try:
            out = self._read_prompt(pending, end, "prefill")
        except Exception:
            log.exception("chunked prefill failed for a request to %s", self.name)
            with self._wake:
                if self._waiting and self._waiting[0] is pending:
                    self._waiting.popleft()
            pending.send(EngineError("the model failed while reading this prompt"))
            return
        self._chunk_seconds_per_token = (time.perf_counter() - started) / (end - done)
        self._keep_read(pending, end, out)

    def _read_prompt(self, pending: _Pending, end: int, slot: str, beside: bool = False) -> StepOutput:
        """Compute the KV of the prompt up to ``end`` on what was read of it before (its reused prefix), and
        nothing else, so that it can run in the prefill thread too."""
        done, past = pending.reused or (0, None)
        ids = pending.request.prompt_ids[:end]
        if self.decoder.shares_kv:
            if pending.buffers is None:
                pending.buffers = self.decoder.kv_buffers(self._room(pending.request.prompt_ids))
            return self.decoder.prefill_after(ids, done, pending.buffers, in_place=True, slot=slot, beside=beside)
        if past is not None:
            return self.decoder.prefill_after(ids, done, past, beside=beside)
        return self.decoder.prefill([ids], beside=beside)

    def _read_ahead(self, pending: _Pending, end: int) -> StepOutput:
        """The prefill thread's work: the prompt's KV up to ``end``, then what the engine thread would otherwise
        make on fresh pages while every stream waits, the arrays the batch joins into and the prefix store's
        blocks (see BatchCache.faulted_join, PrefixCache.copy_blocks)."""
        out = self._read_prompt(pending, end, "beside", beside=True)
        pending.join_into = self._cache.faulted_join(out.present, pending.request.n, len(pending.request.prompt_ids))
        if self.prefix_cache is not None:
            pending.block_copies = self.prefix_cache.copy_blocks(pending.request.prompt_ids[:end],
                                                                 [p[0, :, :end] for p in out.present])
        return out

    def _keep_read(self, pending: _Pending, end: int, out: StepOutput) -> None:
        """What was read of a prompt becomes its reused prefix, and goes into the prefix cache."""
        if self.decoder.shares_kv:
            pending.buffers = out.present
        present = [to_host(p)[:, :, :end] for p in out.present]
        pending.reused = (end, present)
        if self.prefix_cache is not None:
            self._keep(pending.request.prompt_ids[:end], [p[0] for p in present], pending.block_copies)
            pending.block_copies = None
        self.stats.prefill_chunks += 1

    def _prefill(self, group: list[_Pending]) -> None:
        """Read a group's prompts (the rest of them, after a cached prefix or chunks), sample each choice's first
        token, and let the rows that go on join the batch.

        On graphs that write their KV in place a lone prompt is read into buffers with room to decode into: the
        cached prefix's (written there by the prefix store), its chunks', or new ones. An empty batch adopts
        them as they are; a prompt's present without that room was copied whole at the first decode step (77 ms
        for 3.5k tokens of SmolLM2, a stall before its second token). Prompts cached whole are not read at all."""
        reused, past = group[0].reused or (0, None)
        whole = group[0].logits is not None
        lone = len(group) == 1 and self.decoder.shares_kv and not whole
        beside = self._read is not None  # on this thread's share of the cores
        if lone and group[0].buffers is None:
            group[0].buffers = self.decoder.kv_buffers(self._room(group[0].request.prompt_ids))
        if whole:
            out = self._cached_output(group)
        elif group[0].buffers is not None:  # the rest of a prompt read into buffers: its cached prefix's or chunks'
            out = self.decoder.prefill_after(group[0].request.prompt_ids, reused, group[0].buffers, in_place=True,
                                             beside=beside)
            group[0].buffers = None
            self.decoder.release("prefill")
        elif past is not None:  # one prompt, of which only what follows the cached prefix is computed
            out = self.decoder.prefill_after(group[0].request.prompt_ids, reused, past, beside=beside)
        else:
            out = self.decoder.prefill([p.request.prompt_ids for p in group], beside=beside)
        self.stats.prefill_runs += not whole
        rows: list[int] = []
        alive: list[_Sequence] = []
        sent: list[tuple[_Pending, list[Delta]]] = []
        for row, pending in enumerate(group):
            request = pending.request
            sequences = [
                _Sequence(
                    request=pending,
                    index=i,
                    sampler=Sampler(request.params, request.prompt_ids, seed_offset=i,
                                    grammar=request.grammar.matcher() if request.grammar else None),
                    detok=IncrementalDetokenizer(self.tokenizer, request.stop,
                                                 skip_special_tokens=request.skip_special_tokens),
                    position=len(request.prompt_ids),
                    history=TokenHistory(request.prompt_ids) if self._drafts_for(request) else None,
                    draft_length=self.drafter.first_length if self.drafter is not None else 0,
                )
                for i in range(request.n)
            ]
            deltas = [self._accept(seq, out.logits[row]) for seq in sequences]
            for delta in deltas:
                delta.cached_tokens = pending.cached_tokens
            sent.append((pending, deltas))
            still = [s for s in sequences if s.finish_reason is None]
            rows += [row] * len(still)
            alive += still
        # Only now, with every row sampled, does the group join the batch: a fault above leaves it untouched.
        if rows:
            lengths = np.asarray([len(group[r].request.prompt_ids) for r in rows])
            self._cache.join(out.present, lengths, rows=None if rows == list(range(len(group))) else rows,
                             into=group[0].join_into if len(group) == 1 else None)
            group[0].join_into = None
            self._running.extend(alive)
        for pending in group:  # what they came with is the batch's now, or not needed
            pending.buffers = pending.logits = None
        self._update_stats()
        for pending, deltas in sent:
            pending.send(deltas)
        # After the first tokens are on their way: copying a long prompt's KV into the store is not what its client
        # waits for (4k tokens of SmolLM2, 188 MB: 50 ms on memory the heap recycles, 430-550 ms on fresh pages).
        # Before the next step, which may write into the same buffers beyond the prompt.
        if self.prefix_cache is not None and not whole:
            present = [to_host(p) for p in out.present]
            for row, pending in enumerate(group):
                self._keep(pending.request.prompt_ids, [p[row] for p in present], logits=out.logits[row])

    def _cached_output(self, group: list[_Pending]) -> StepOutput:
        """What reading prompts cached whole would give: their KV, stacked as the batch's cache would lay them out,
        and their last tokens' logits."""
        if len(group) == 1:
            present = group[0].reused[1]  # type: ignore[index]
        else:
            stacked = BatchCache(right_padded=self.decoder.right_padded, shared=self.decoder.shares_kv)
            for pending in group:
                stacked.join(pending.reused[1], [len(pending.request.prompt_ids)])  # type: ignore[index]
            present = stacked.past
        return StepOutput(logits=np.stack([pending.logits for pending in group]), present=present)  # type: ignore[misc]

    def _keep(self, ids: list[int], kv: list[Any], copies: dict[int, list[np.ndarray]] | None = None,
              logits: np.ndarray | None = None) -> None:
        """Keep KV in the prefix store (and a whole prompt's ``logits``). The store only saves later work, so a
        fault in it (no memory for the blocks, say) costs the reuse, not a request: after a prefill the rows have
        joined and their first tokens are sent (_prefill_group would read them again), and a finished row's step
        serves the others too."""
        try:
            self.prefix_cache.store(ids, kv, copies, logits)  # type: ignore[union-attr]
        except Exception:
            log.exception("keeping KV in the prefix cache failed for %s", self.name)

    def _can_verify(self, name: str) -> bool:
        """Drafted tokens are verified on shared KV buffers (a row that rejects some just keeps a shorter
        length) by a graph that returns logits for several positions (exports that take num_logits_to_keep)."""
        if self.decoder.multi_position_logits and self._cache.shared:
            return True
        log.warning("speculative decoding is off for %s: it needs a fused graph exported by this version, on "
                    "the CPU or at fp16 on CUDA (this one: graph=%s, logits for several positions %s, shared KV "
                    "%s)", name, "fused" if self.decoder.right_padded else "optimum",
                    self.decoder.multi_position_logits, self._cache.shared)
        return False

    def _drafts_for(self, request: GenerationRequest) -> bool:
        """Constrained rows decode a token per step: their grammar would have to follow every drafted token."""
        return self.drafter is not None and request.speculative and request.grammar is None

    def _drafts(self) -> list[list[int]]:
        """Each running row's drafted tokens (none for rows that do not speculate or find no match); none at
        all in a batch above ``SPECULATION_MAX_ROWS``."""
        if self.drafter is None or len(self._running) > SPECULATION_MAX_ROWS:
            return [[] for _ in self._running]
        return [self.drafter.draft(seq.history.tokens, min(seq.draft_length,
                                                           seq.request.request.max_tokens - seq.generated - 1))
                if seq.history is not None else [] for seq in self._running]

    def _decode_step(self) -> None:
        """One step for every running row: its next token, and the tokens drafted after it, if any (the same
        multi-token step as a chunked prefill's); each row then samples position by position and keeps the
        drafts up to the first its sampler disagrees with."""
        drafts = self._drafts()
        new = 1 + max(map(len, drafts), default=0)
        tokens = np.asarray([[s.next_token, *d, *[s.next_token] * (new - 1 - len(d))]
                             for s, d in zip(self._running, drafts, strict=True)], dtype=np.int64)
        positions = np.asarray([[s.position] for s in self._running], dtype=np.int64) + np.arange(new)
        for seq in self._running:  # grammar masks are computed while the model runs
            if seq.sampler.grammar is not None:
                seq.sampler.grammar.prefetch(self._grammar_pool)
        mask = self._cache.next_mask(new)
        # Several rows go through the int8 prompt graph, whose integer GEMM outruns the int4 kernel once a step
        # multiplies that many (SmolLM2 int4, 2-core Xeon, 8 rows: 20.9 instead of 23.8 ms; Qwen2.5-Coder-0.5B:
        # 39.4 instead of 52.7 ms; at 1 row 7.7 instead of 5.5 ms). Not beside a prompt read in the prefill thread,
        # which has that graph's half-width session.
        wide = bool(self.int8_decode_rows) and len(self._running) >= self.int8_decode_rows and self._read is None
        started = time.perf_counter()
        out = self.decoder.forward(tokens, mask, positions, self._cache.next_past(new), in_place=self._cache.shared,
                                   all_logits=new > 1, keep=new, prompt=wide, beside=self._read is not None)
        self._step_seconds = time.perf_counter() - started
        self.stats.int8_steps += wide
        logits = out.logits if new > 1 else out.logits[:, None, :]
        advance = np.ones(len(self._running), dtype=np.int64)
        self.stats.steps += 1
        self.stats.last_batch_size = len(self._running)
        by_request: dict[int, tuple[_Pending, list[Delta]]] = {}
        for row, (seq, draft) in enumerate(zip(self._running, drafts, strict=True)):
            try:
                delta = self._verify(seq, logits[row], draft)
            except Exception:
                log.exception("sampling failed for a request to %s", self.name)
                seq.finish_reason = "error"
                seq.request.cancelled = True
                seq.request.send(EngineError("the model failed while generating this response"))
                continue
            advance[row] = len(delta.token_ids)
            by_request.setdefault(id(seq.request), (seq.request, []))[1].append(delta)
        self._cache.step(out.present, advance if new > 1 else None)
        if any(s.finish_reason for s in self._running):
            self._retain([s for s in self._running if s.finish_reason is None])
        self._update_stats()
        for pending, deltas in by_request.values():
            if not pending.cancelled:
                pending.send(deltas)

    def _verify(self, seq: _Sequence, logits: np.ndarray, draft: list[int]) -> Delta:
        """Sample ``seq`` at each position in turn while the token sampled is the one drafted there, and return
        the tokens taken as one delta. Sampling from the model's own distribution and accepting on equality is
        the speculative-sampling rule for a drafter that proposes one token with certainty."""
        delta = self._accept(seq, logits[0])
        seq.position += 1
        accepted = 0
        for position, drafted in enumerate(draft, start=1):
            if seq.finish_reason or seq.next_token != drafted:
                break
            accepted += 1
            more = self._accept(seq, logits[position])
            seq.position += 1
            delta.text += more.text
            delta.token_ids += more.token_ids
            delta.logprobs += more.logprobs
            delta.finish_reason = more.finish_reason
        if draft and self.drafter is not None:
            seq.draft_length = self.drafter.next_length(seq.draft_length, len(draft), accepted)
            self.stats.drafted_tokens += len(draft)
            self.stats.accepted_tokens += accepted
        return delta

    def _accept(self, seq: _Sequence, logits: np.ndarray) -> Delta:
        """Sample one token for ``seq`` and turn it into a delta, finishing the sequence if due."""
        request = seq.request.request
        token, logprob = seq.sampler.sample(logits)
        seq.generated += 1
        seq.output.append(token)
        seq.next_token = token
        if seq.history is not None:
            seq.history.append(token)
        delta = Delta(index=seq.index, token_ids=[token], logprobs=[logprob] if logprob else [])
        if token in self.eos and not request.ignore_eos:
            seq.finish_reason = "stop"
        else:
            delta.text = seq.detok.add(token)
            if seq.detok.stopped or seq.sampler.finished:
                seq.finish_reason = "stop"
            elif seq.generated >= request.max_tokens:
                seq.finish_reason = "length"
        if seq.finish_reason:
            delta.text += seq.detok.flush()
            delta.finish_reason = seq.finish_reason
        return delta

    def _retain(self, keep: list[_Sequence]) -> None:
        rows = {id(s): i for i, s in enumerate(self._running)}
        # A finished answer's KV serves the conversation's next turn. Decode steps computed it one token at a time,
        # which rounds otherwise than the next turn's prefill would without the cache: in the last bits of fp32
        # (greedy answers equal, tested), more with int4. Where prompts run through an int8 graph of their own the
        # two differ by a whole quantization scheme, so there only prompts are kept.
        if self.prefix_cache is not None and not self.decoder.has_prefill_graph:
            kept = {id(s) for s in keep}
            for seq in self._running:
                if id(seq) not in kept and seq.finish_reason in ("stop", "length"):
                    kv = self._cache.row(rows[id(seq)])
                    self._keep([*seq.request.request.prompt_ids, *seq.output][: kv[0].shape[1]], kv)
        if self.prefix_cache is not None and not keep and self._cache.rows == 1 and self._cache.shared and \
                isinstance(self._cache.past[0], np.ndarray):  # a lone sequence's buffers, for its next turn
            self.prefix_cache.hold(self._running[0].request.request.prompt_ids, self._cache.past)
        self._cache.keep([rows[id(s)] for s in keep])
        self._running = keep
        if not keep:
            self.decoder.release()
