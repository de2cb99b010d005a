"""Chunked prefill: a long prompt arriving while others decode is read a chunk per step, and they keep moving."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from fastllm.config import ModelConfig, RuntimeConfig
from fastllm.runtime.generation import GenerationRequest
from fastllm.runtime.models import ServedModel, load_model
from fastllm.runtime.prefix_cache import PrefixCache
from fastllm.runtime.sampling import SamplingParams


def _load(folder: Path, **runtime: object) -> ServedModel:
    return load_model(ModelConfig(model_id=str(folder)), RuntimeConfig(threads=1, **runtime), folder.parent)


def _request(prompt: list[int], tokens: int) -> GenerationRequest:
    return GenerationRequest(prompt_ids=prompt, params=SamplingParams(temperature=0.0), max_tokens=tokens,
                             ignore_eos=True)


async def _collect(model: ServedModel, request: GenerationRequest, progress: list[int] | None = None,
                   first: list[int] | None = None, watched: list[int] | None = None) -> list[int]:
    """The greedy tokens; ``progress[0]`` follows how many have come, and at this request's first token
    ``first[0]`` takes the value of ``watched[0]`` (another request's progress)."""
    ids: list[int] = []
    async for step in model.generator.generate(request):
        if not ids and first is not None and watched is not None:
            first[0] = watched[0]
        for delta in step:
            ids += delta.token_ids
        if progress is not None:
            progress[0] = len(ids)
    return ids


@pytest.mark.parametrize(("export", "stall_ratio"), [("smollm2_fp32", 0.0), ("smollm2_fused_int4", 0.0),
                                                     ("smollm2_fused_int4", 3.0)])
def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(export: str, stall_ratio: float,
                                                                    request: pytest.FixtureRequest) -> None:
    """Fixed chunks of 64 tokens; or (stall ratio 3) chunks sized from the measured step and chunk times."""
    folder = request.getfixturevalue(export)
    whole = _load(folder, prefix_cache_mb=0)
    chunk = 64 if not stall_ratio else 256
    chunked = _load(folder, prefix_cache_mb=0, prefill_chunk_tokens=chunk, prefill_stall_ratio=stall_ratio)
    try:
        text = "The history of the lighthouse keepers of the northern coast is long and full of storms. " * 30
        long_prompt = whole.tokenizer.encode(text, add_special_tokens=False)
        short = whole.tokenizer.encode("Count slowly from one to one hundred:", add_special_tokens=False)
        assert len(long_prompt) > 6 * 64
        expected = asyncio.run(_collect(whole, _request(long_prompt, 16)))
        alone = asyncio.run(_collect(whole, _request(short, 120)))

        async def together() -> tuple[list[int], list[int], int, int, int]:
            progress, at_first_token = [0], [0]
            running = asyncio.create_task(_collect(chunked, _request(short, 120), progress))
            while progress[0] < 4:  # the short stream is decoding
                await asyncio.sleep(0.01)
            before = progress[0]
            got = await _collect(chunked, _request(long_prompt, 16), first=at_first_token, watched=progress)
            return got, await running, before, at_first_token[0], chunked.generator.stats.prefill_chunks

        got, running_ids, before, during, chunks = asyncio.run(together())
    finally:
        whole.close()
        chunked.close()
    assert got == expected  # chunks reproduce the whole prefill's answer
    assert running_ids == alone  # and the running stream's
    assert chunks >= len(long_prompt) // 64 - 1
    # With a stall ratio, a chunk is what fits in about two of the running row's steps: far fewer tokens than
    # prefill_chunk_tokens (256 here) whatever the machine's speed, as both times scale with it.
    if stall_ratio:
        assert chunks > len(long_prompt) // 256 + 2
    # A decode step of the running stream follows every chunk: it kept moving while the prompt was read.
    assert during - before >= chunks


@pytest.mark.parametrize("prefill_graph", [True, False])
def test_chunks_written_in_place_give_the_whole_prefill(smollm2_fused_int4: Path, prefill_graph: bool,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A prompt read in chunks into buffers sized for all of it (graphs that share KV buffers) ends with the
    logits of one whole prefill, bit for bit, from any starting point (a cached prefix); through the int8 prompt
    graph and through the int4 graph (GPUs, prefill_graph = false). Chunks above PROMPT_PIECE tokens are read
    in pieces (made small here), bit for bit too."""
    from fastllm.manifest import read_manifest
    from fastllm.runtime import decoder as decoder_module
    from fastllm.runtime.decoder import Decoder

    monkeypatch.setattr(decoder_module, "PROMPT_PIECE", 40)

    decoder = Decoder(smollm2_fused_int4, read_manifest(smollm2_fused_int4), threads=1, prefill_graph=prefill_graph)
    assert decoder.has_prefill_graph == prefill_graph
    assert decoder.shares_kv
    prompt = list(range(1000, 1300))
    whole = decoder.prefill([prompt])
    store = PrefixCache(2**30)  # the buffers of a cached prefix are the ones the prefix store fills (32 tokens)
    store.store(prompt[:37], [p[0] for p in decoder.prefill([prompt[:37]]).present])
    cached, filled = store.match(prompt, len(prompt))
    assert cached == 32
    for done, buffers in ((0, decoder.kv_buffers(len(prompt))), (cached, filled)):
        for size in (8, 29, 64, 16, 100, 1000):
            end = min(len(prompt), done + size)
            out = decoder.prefill_after(prompt[:end], done, buffers, in_place=True)
            assert out.present is buffers  # written in place
            done = end
            if done == len(prompt):
                break
        np.testing.assert_array_equal(out.logits, whole.logits)
        for ours, theirs in zip(buffers, whole.present, strict=True):
            np.testing.assert_array_equal(ours[:, :, : len(prompt)], theirs[:, :, : len(prompt)])
    decoder.release()


def test_chunk_size_follows_the_stall_ratio(smollm2_fp32: Path) -> None:
    """Sized from measurements: (ratio - 1) step times' worth of prompt tokens, within [8, prefill_chunk]."""
    from fastllm.runtime.generation import MIN_CHUNK_TOKENS

    model = _load(smollm2_fp32, prefix_cache_mb=0, prefill_chunk_tokens=256, prefill_stall_ratio=3.0)
    try:
        engine = model.generator
        assert engine._chunk_tokens() == 256  # nothing decoding has been measured: no stream to protect
        engine._step_seconds = 0.010
        assert engine._chunk_tokens() == MIN_CHUNK_TOKENS  # no chunk measured yet: start small
        engine._chunk_seconds_per_token = 0.001
        assert engine._chunk_tokens() == 20  # 2 x 10 ms at 1 ms a token
        engine._chunk_seconds_per_token = 0.01
        assert engine._chunk_tokens() == MIN_CHUNK_TOKENS
        engine._chunk_seconds_per_token = 0.00001
        assert engine._chunk_tokens() == 256
        engine.prefill_stall_ratio = 0.0
        engine._chunk_seconds_per_token = 0.001
        assert engine._chunk_tokens() == 256
    finally:
        model.close()


def test_a_chunk_never_leaves_a_one_token_last_step(smollm2_fused_int4: Path) -> None:
    """A one-token step rounds otherwise than a multi-token one (see PrefixCache.match): the chunk before the
    last stops short so that at least two tokens remain."""
    from fastllm.runtime.generation import _Pending

    model = _load(smollm2_fused_int4, prefix_cache_mb=0)
    loop = asyncio.new_event_loop()
    try:
        engine = model.generator
        pending = _Pending(_request(list(range(1000, 1300)), 1), loop)
        pending.reused = (0, None)
        engine._prefill_chunk(pending, 299)  # would leave one token
        assert pending.reused is not None and pending.reused[0] == 298
        engine.decoder.release("prefill")
    finally:
        loop.close()
        model.close()


def test_a_short_prompt_arriving_while_others_decode_is_prefilled_whole(smollm2_fp32: Path) -> None:
    """Only prompts above prefill_chunk_tokens go in chunks, whatever the stall ratio would allow: split, a
    short one would wait longer for its first token and spare the running rows little."""
    model = _load(smollm2_fp32, prefix_cache_mb=0, prefill_chunk_tokens=256, prefill_stall_ratio=3.0)
    try:
        short = model.tokenizer.encode("A short story about the sea. " * 20, add_special_tokens=False)
        assert 64 < len(short) < 256

        async def together() -> None:
            progress = [0]
            running = asyncio.create_task(_collect(model, _request([1, 2, 3], 60), progress))
            while progress[0] < 4:
                await asyncio.sleep(0.01)
            await _collect(model, _request(short, 4))
            await running

        asyncio.run(together())
        assert model.generator.stats.prefill_chunks == 0
        assert model.generator.stats.prefill_runs == 2
    finally:
        model.close()


def test_alone_a_long_prompt_is_prefilled_whole(smollm2_fp32: Path) -> None:
    model = _load(smollm2_fp32, prefix_cache_mb=0, prefill_chunk_tokens=64)
    try:
        prompt = model.tokenizer.encode("A long story about the sea. " * 60, add_special_tokens=False)
        asyncio.run(_collect(model, _request(prompt, 4)))
        assert model.generator.stats.prefill_chunks == 0
        assert model.generator.stats.prefill_runs == 1
    finally:
        model.close()


# ---- KV memory as a budget -----------------------------------------------------------------------------


def test_admission_waits_for_kv_memory_and_refuses_what_can_never_fit(smollm2_fp32: Path) -> None:
    from fastllm.errors import InvalidRequestError

    model = _load(smollm2_fp32, prefix_cache_mb=0, kv_budget_mb=2)
    engine = model.generator
    try:
        per_token = engine.kv_token_bytes  # 46 KB for SmolLM2's fp32 cache: 2 MB hold about 45 tokens
        text = "Tell me about the sea, its moods and storms. " * 5
        prompt = model.tokenizer.encode(text, add_special_tokens=False)[:30]
        assert (len(prompt) + 1) * per_token <= 2 * 2**20 < 2 * (len(prompt) + 1) * per_token

        async def two() -> tuple[list[float], list[float]]:
            finished, started = [0.0, 0.0], [0.0, 0.0]

            async def one(i: int) -> None:
                async for _ in engine.generate(_request(prompt, 6)):
                    started[i] = started[i] or asyncio.get_running_loop().time()
                finished[i] = asyncio.get_running_loop().time()

            await asyncio.gather(one(0), one(1))
            return started, finished

        started, finished = asyncio.run(two())
        # Both rows would not fit together: one ran, then the other.
        assert max(started) >= min(finished)
        assert engine.kv_bytes() == 0

        long_prompt = model.tokenizer.encode("The sea. " * 40, add_special_tokens=False)

        async def refused() -> None:
            async for _ in engine.generate(_request(long_prompt, 4)):
                pass

        with pytest.raises(InvalidRequestError) as caught:
            asyncio.run(refused())
        assert caught.value.code == "kv_budget_exceeded"
    finally:
        model.close()
