"""Embeddings: inputs from concurrent requests are batched into one run, then pooled in numpy.

Inputs queued together (up to ``SORT_WINDOW`` batches' worth, from any requests) are sorted by length before
they are cut into batches, so a batch pads its rows to a length close to theirs rather than to the longest
input in sight (Infinity does the same); the cuts fall where they save the most padding for the runs they add
(``length_batches``), so even one request's inputs go in batches of like lengths. Each input's vector still
goes back to its own request and place.

Pre (tokenize, done by the caller) → core (``session.run`` on a padded batch) → post (pooling and
normalisation exactly as the model's sentence-transformers modules declare them).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fastllm.errors import EngineError, ModelLoadError, OverloadedError
from fastllm.manifest import Manifest
from fastllm.runtime.providers import create_session

log = logging.getLogger(__name__)

# Batches' worth of queued inputs sorted by length together before they are cut into batches.
SORT_WINDOW = 4
# What one more session run costs, in padded tokens: the price of cutting a batch in two (measured on MiniLM,
# 2 cores: a run's fixed cost is about what a row of 32 tokens costs).
RUN_COST_TOKENS = 32


def length_batches(lengths: list[int], max_rows: int, run_cost: int = RUN_COST_TOKENS) -> list[range]:
    """Cut inputs sorted by length into batches of at most ``max_rows`` that cost least in all: each batch pads
    its rows to its longest, and each run costs ``run_cost`` tokens more. One request of 32 inputs from 4 to 120
    words is then several batches of similar lengths, not one padded to the longest (dynamic programming over
    the cut points: n x max_rows steps)."""
    best = [0] + [float("inf")] * len(lengths)
    start = [0] * (len(lengths) + 1)
    for end in range(1, len(lengths) + 1):
        for first in range(max(0, end - max_rows), end):
            cost = best[first] + (end - first) * lengths[end - 1] + run_cost
            if cost < best[end]:
                best[end], start[end] = cost, first
    batches: list[range] = []
    end = len(lengths)
    while end > 0:
        batches.append(range(start[end], end))
        end = start[end]
    return batches[::-1]


def pool(hidden: np.ndarray, mask: np.ndarray, mode: str, normalize: bool) -> np.ndarray:
    """[batch, seq, dim] token states → [batch, dim] vectors."""
    if mode == "cls":
        vectors = hidden[:, 0]
    elif mode == "last":
        last = mask.sum(axis=1) - 1
        vectors = hidden[np.arange(hidden.shape[0]), last]
    else:
        weights = mask[:, :, None].astype(hidden.dtype)
        vectors = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
    if normalize:
        vectors = vectors / np.clip(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12, None)
    return vectors.astype(np.float32, copy=False)


@dataclass
class _Job:
    ids: list[int]
    future: asyncio.Future[np.ndarray]
    loop: asyncio.AbstractEventLoop


class EmbeddingEngine:
    def __init__(self, folder: Path, manifest: Manifest, *, providers: Any = "auto",
                 provider_options: dict[str, dict[str, Any]] | None = None, threads: int = 0,
                 batch_size: int = 32, max_queue: int = 1024) -> None:
        path = folder / manifest.onnx_file
        if not path.is_file():
            raise ModelLoadError(f"{path} is missing; re-run `fastllm export`")
        loaded = create_session(path, requested=providers, provider_options=provider_options, threads=threads)
        self.session = loaded.session
        self.provider = loaded.provider
        self._input_names = {i.name for i in self.session.get_inputs()}
        self.pooling = manifest.pooling or "mean"
        self.normalize = manifest.normalize
        self.batch_size = batch_size
        self.max_queue = max_queue
        self._jobs: list[_Job] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=f"embed-{manifest.name}", daemon=True)
        self._thread.start()

    async def embed(self, batch: list[list[int]]) -> list[np.ndarray]:
        loop = asyncio.get_running_loop()
        jobs = [_Job(ids, loop.create_future(), loop) for ids in batch]
        with self._wake:
            if self._stopping:
                raise OverloadedError("the server is shutting down", status=503)
            # A request larger than the whole queue is still served when nothing waits: refusing it would
            # answer "retry shortly" to a request that can never succeed.
            if self._jobs and len(self._jobs) + len(jobs) > self.max_queue:
                raise OverloadedError("too many embedding inputs are queued; retry shortly")
            self._jobs.extend(jobs)
            self._wake.notify()
        return list(await asyncio.gather(*(job.future for job in jobs)))

    def run_batch(self, batch: list[list[int]]) -> np.ndarray:
        """Pad, run and pool one batch of token-id lists (also used directly by export validation)."""
        width = max(len(ids) for ids in batch)
        input_ids = np.zeros((len(batch), width), dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = ids
            mask[row, : len(ids)] = 1
        feeds = {"input_ids": input_ids, "attention_mask": mask}
        if "token_type_ids" in self._input_names:
            feeds["token_type_ids"] = np.zeros_like(input_ids)
        hidden = self.session.run(None, feeds)[0]
        return pool(hidden, mask, self.pooling, self.normalize)

    def close(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._jobs and not self._stopping:
                    self._wake.wait()
                if self._stopping and not self._jobs:
                    return
                taken = SORT_WINDOW * self.batch_size
                jobs, self._jobs = self._jobs[:taken], self._jobs[taken:]
            jobs.sort(key=lambda job: len(job.ids))
            for rows in length_batches([len(job.ids) for job in jobs], self.batch_size):
                self._run([jobs[row] for row in rows if not jobs[row].future.done()])

    def _run(self, jobs: list[_Job]) -> None:
        if not jobs:  # every request in this batch went away
            return
        try:
            vectors = self.run_batch([job.ids for job in jobs])
        except Exception:
            log.exception("embedding batch failed")
            for job in jobs:
                job.loop.call_soon_threadsafe(_fail, job.future)
            return
        for job, vector in zip(jobs, vectors, strict=True):
            job.loop.call_soon_threadsafe(_resolve, job.future, vector)


def _resolve(future: asyncio.Future[np.ndarray], value: np.ndarray) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future[np.ndarray]) -> None:
    if not future.done():
        future.set_exception(EngineError("the model failed while embedding this input"))
