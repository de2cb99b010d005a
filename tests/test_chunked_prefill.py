"""Chunked prefill: a long prompt arriving while others decode is read beside their steps in a thread of its own
(CPU), or a chunk per step, and they keep moving."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from fastllm.config import ModelConfig, RuntimeConfig
from fastllm.runtime.decoder import ROUNDING
from fastllm.runtime.generation import GenerationRequest
from fastllm.runtime.models import ServedModel, load_model
from fastllm.runtime.prefix_cache import PrefixCache
from fastllm.runtime.sampling import SamplingParams


def _load(folder: Path, **runtime: object) -> ServedModel:
    return load_model(ModelConfig(model_id=str(folder)), RuntimeConfig(**{"threads": 1, **runtime}), folder.parent)


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
    whole = _load(folder, prefix_cache_mb=0, int8_decode_rows=1)  # rows alike alone and batched on every CPU
    chunk = 64 if not stall_ratio else 256
    chunked = _load(folder, prefix_cache_mb=0, prefill_chunk_tokens=chunk, prefill_stall_ratio=stall_ratio,
                    int8_decode_rows=1)
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


@pytest.mark.parametrize("export", ["smollm2_fp32", "smollm2_fused_int4"])
def test_a_long_prompt_is_read_beside_the_decode_steps(export: str, request: pytest.FixtureRequest) -> None:
    """The prefill thread reads all but the prompt's last two tokens while the running stream goes on decoding;
    the answers are those of a whole prefill, and requests queued behind the long prompt are not held up by it."""
    folder = request.getfixturevalue(export)
    whole = _load(folder, prefix_cache_mb=0, int8_decode_rows=1)  # rows alike alone and batched on every CPU
    beside = _load(folder, prefix_cache_mb=0, prefill_chunk_tokens=64, threads=2, prefill_beside=True,
                   int8_decode_rows=1)
    try:
        text = "The history of the lighthouse keepers of the northern coast is long and full of storms. " * 40
        long_prompt = whole.tokenizer.encode(text, add_special_tokens=False)
        short = whole.tokenizer.encode("Count slowly from one to one hundred:", add_special_tokens=False)
        expected = asyncio.run(_collect(whole, _request(long_prompt, 8)))
        alone = asyncio.run(_collect(whole, _request(short, 200)))
        behind = asyncio.run(_collect(whole, _request(short[:5], 4)))

        async def together() -> tuple[list[int], list[int], list[int], int, int, int]:
            progress, at_first_token, at_behind = [0], [0], [0]
            running = asyncio.create_task(_collect(beside, _request(short, 200), progress))
            while progress[0] < 4:  # the short stream is decoding
                await asyncio.sleep(0.01)
            before = progress[0]
            long_task = asyncio.create_task(_collect(beside, _request(long_prompt, 8), first=at_first_token,
                                                     watched=progress))
            while beside.generator._read is None and not beside.generator.stats.prefill_beside:
                await asyncio.sleep(0.001)  # until the long prompt is being read
            queued = await _collect(beside, _request(short[:5], 4), first=at_behind, watched=at_first_token)
            return await long_task, queued, await running, before, at_first_token[0], at_behind[0]

        got, queued, running_ids, before, during, long_done_at_behind = asyncio.run(together())
        stats = beside.generator.stats
        # While the prompt is read beside them the decode steps take the int4 graph (the prefill thread holds the
        # int8 one), whose one-row kernel rounds its own way on some CPUs: there the two short requests' answers,
        # batched during the read, are compared with their solo ones up to their first tokens (read by the prompt
        # graph), elsewhere whole.
        alike = beside.generator.decoder.one_row_drift() <= ROUNDING
    finally:
        whole.close()
        beside.close()
    assert got == expected  # read beside the steps, then decoded: the whole prefill's answer
    if alike:
        assert running_ids == alone and queued == behind
    else:
        assert running_ids[:4] == alone[:4] and queued[:1] == behind[:1]
    assert stats.prefill_beside == 1 and stats.prefill_chunks == 1
    # The running stream went on while the prompt was read: a whole prefill between two steps would have let it
    # take one token (on 2 loaded cores it takes dozens here).
    assert during - before >= 4
    assert long_done_at_behind == 0  # the short request behind it answered before the long prompt's first token


def test_a_prompt_that_fails_beside_the_steps_fails_alone(smollm2_fp32: Path) -> None:
    """A token id outside the vocabulary makes ONNX Runtime's Gather fail in the prefill thread (the server refuses
    such ids before; the fused graphs' quantized lookup does not check them): that request gets the engine's error,
    the running stream finishes as it would have, and the engine serves on."""
    from fastllm.errors import EngineError

    model = _load(smollm2_fp32, prefix_cache_mb=0, prefill_chunk_tokens=64, threads=2, prefill_beside=True)
    try:
        short = model.tokenizer.encode("Count slowly from one to one hundred:", add_special_tokens=False)
        alone = asyncio.run(_collect(model, _request(short, 60)))
        bad = [*range(1000, 1200), 10**7, *range(1200, 1300)]

        async def together() -> tuple[list[int], BaseException | None]:
            progress = [0]
            running = asyncio.create_task(_collect(model, _request(short, 60), progress))
            while progress[0] < 4:
                await asyncio.sleep(0.01)
            try:
                await _collect(model, _request(bad, 4))
            except EngineError as error:
                return await running, error
            return await running, None

        running_ids, error = asyncio.run(together())
        assert isinstance(error, EngineError)
        assert running_ids == alone
        assert model.generator._read is None
        assert asyncio.run(_collect(model, _request(short, 60))) == alone
    finally:
        model.close()


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
    cached, filled, _ = store.match(prompt, len(prompt))
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


def test_sessions_for_reading_beside_are_loaded_only_where_there_are_cores_to_halve(smollm2_fused_int4: Path) -> None:
    """Half the threads each for the decode steps and the prompt read beside them: none on one thread, where the
    engine reads in chunks instead; the prompt graph (int8) and the decode graph (int4) get one session each."""
    from fastllm.manifest import read_manifest
    from fastllm.runtime.decoder import Decoder

    manifest = read_manifest(smollm2_fused_int4)
    assert Decoder(smollm2_fused_int4, manifest, threads=1, beside=True).beside_sessions is None
    assert Decoder(smollm2_fused_int4, manifest, threads=2).beside_sessions is None
    decoder = Decoder(smollm2_fused_int4, manifest, threads=2, beside=True)
    assert decoder.beside_sessions is not None
    decode, prompt = decoder.beside_sessions
    assert Path(decode._model_path).name == manifest.onnx_file
    assert Path(prompt._model_path).name == manifest.prefill_file
    assert decode.get_session_options().intra_op_num_threads == prompt.get_session_options().intra_op_num_threads == 1


def test_auto_loads_the_sessions_beside_where_the_graphs_take_at_most_an_eighth_of_the_memory(
        smollm2_fused_int4: Path, tmp_path: Path) -> None:
    """``prefill_beside = "auto"``: the second pair of sessions holds about the graphs' files again, so it is loaded
    where those (both graphs with their external data) fit an eighth of the memory, and the container's limit counts
    where it is lower than the machine's."""
    from fastllm.manifest import read_manifest
    from fastllm.runtime.decoder import Decoder, _fits_beside
    from fastllm.runtime.providers import memory_bytes

    manifest = read_manifest(smollm2_fused_int4)
    graphs = [smollm2_fused_int4 / manifest.onnx_file, smollm2_fused_int4 / manifest.prefill_file]
    files = sum(f.stat().st_size for f in smollm2_fused_int4.iterdir()
                if f.name.startswith((manifest.onnx_file, manifest.prefill_file)))
    assert files > (smollm2_fused_int4 / f"{manifest.onnx_file}.data").stat().st_size  # external data counted
    assert _fits_beside(graphs, "m", memory=files * 8)
    assert not _fits_beside(graphs, "m", memory=files * 8 - 1)
    assert _fits_beside([graphs[0], None], "m", memory=files * 8 - 1)  # the decode graph alone (prefill_graph false)

    machine = memory_bytes(tmp_path / "no-cgroup")
    limit = tmp_path / "memory.max"
    limit.write_text(f"{2**30}\n")
    assert memory_bytes(limit) == 2**30 < machine
    limit.write_text("max\n")
    assert memory_bytes(limit) == machine

    decoder = Decoder(smollm2_fused_int4, manifest, threads=2, beside="auto")
    assert (decoder.beside_sessions is not None) == _fits_beside(graphs, "m")
    assert Decoder(smollm2_fused_int4, manifest, threads=1, beside="auto").beside_sessions is None
