"""Prefix caching: prompts that start like an earlier one reuse its KV, token-exactly, on every architecture."""

from __future__ import annotations

import asyncio
import concurrent.futures
from pathlib import Path

import numpy as np
import openai
import pytest
from conftest import tiny_export
from serving import Server

from fastllm.config import ModelConfig, RuntimeConfig
from fastllm.runtime.generation import GenerationRequest
from fastllm.runtime.models import ServedModel, load_model
from fastllm.runtime.prefix_cache import PrefixCache
from fastllm.runtime.sampling import SamplingParams

CHAT = "SmolLM2-135M-Instruct"


def _greedy(model: ServedModel, prompt: list[int], tokens: int = 12) -> tuple[list[int], int]:
    """(greedy tokens, prompt tokens reused from the prefix cache) through the engine the server runs."""
    async def run() -> tuple[list[int], int]:
        ids, cached = [], 0
        request = GenerationRequest(prompt_ids=prompt, params=SamplingParams(temperature=0.0), max_tokens=tokens,
                                    ignore_eos=True)
        async for step in model.generator.generate(request):
            for delta in step:
                ids += delta.token_ids
                cached = max(cached, delta.cached_tokens)
        return ids, cached

    return asyncio.run(run())


def _load(folder: Path, prefix_cache_mb: int, **runtime: object) -> ServedModel:
    return load_model(ModelConfig(model_id=str(folder)),
                      RuntimeConfig(threads=1, prefix_cache_mb=prefix_cache_mb, **runtime), folder.parent)


def _token_exact(folder: Path, shared: list[int], tails: list[list[int]], same: int | None = None,
                 **runtime: object) -> None:
    """Each prompt (shared + tail) gives the same greedy tokens (the first ``same``) with the cache off and on,
    reusing the shared part's full blocks from the second prompt on, and all of a prompt read before."""
    off, on = _load(folder, 0, **runtime), _load(folder, 64, **runtime)
    try:
        for i, tail in enumerate(tails):
            prompt = shared + tail
            expected, none = _greedy(off, prompt)
            got, cached = _greedy(on, prompt)
            assert got[:same] == expected[:same]
            assert none == 0
            block = on.generator.prefix_cache.block
            again = tail in tails[:i]
            assert cached == (len(prompt) if again else 0 if i == 0 else len(shared) // block * block)
    finally:
        off.close()
        on.close()


@pytest.mark.parametrize(("name", "options"), [
    ("llama", {}), ("mistral", {}), ("qwen2", {}), ("phi3", {}), ("gemma", {}),
    ("llama", {"graph": "fused"}), ("qwen2", {"graph": "fused"}), ("mistral", {"graph": "fused"}),
    ("phi3", {"graph": "fused"}), ("gemma", {"graph": "fused"}),
    ("gemma3", {}), ("qwen3", {}), ("granite", {}), ("smollm3", {}),
    ("gemma3", {"graph": "fused"}), ("qwen3", {"graph": "fused"}), ("granite", {"graph": "fused"}),
    ("smollm3", {"graph": "fused"}),
])
def test_reuse_is_token_exact_on_every_architecture(name: str, options: dict) -> None:
    rng = np.random.default_rng(0)
    shared = [int(t) for t in rng.integers(10, 300, 70)]
    _token_exact(tiny_export(name, **options), shared, [[11, 12, 13], [14, 15], [16, 17, 18, 19, 20], [14, 15]])


@pytest.mark.parametrize("graph", [{}, {"graph": "fused"}])
def test_reuse_is_token_exact_with_the_cache_bound_as_on_gpus(graph: dict) -> None:
    """The IOBinding path GPUs take (the KV in OrtValues between steps, to the host only for the prefix store
    and joins), run on the CPU."""
    rng = np.random.default_rng(1)
    shared = [int(t) for t in rng.integers(10, 300, 40)]
    _token_exact(tiny_export("llama", **graph), shared, [[11, 12, 13], [14, 15, 16, 17], [11, 12, 13]],
                 io_binding="on")


@pytest.mark.gpu
@pytest.mark.parametrize("options", [{"dtype": "fp16"}, {"dtype": "fp16", "quantize": "int4"}])
def test_reuse_on_cuda_matches_the_cache_off(options: dict) -> None:
    """On a lent GPU: a cached prefix goes up to the device buffers the remainder is computed into in place;
    the greedy start equals the cache off's (CUDA's attention for a prompt with a past may round otherwise
    than without one, hence the first tokens only, as in test_fused's CUDA tests)."""
    rng = np.random.default_rng(2)
    shared = [int(t) for t in rng.integers(10, 300, 40)]
    _token_exact(tiny_export("llama", graph="fused", **options), shared, [[11, 12, 13], [14, 15, 16, 17], [11, 12, 13]],
                 same=4, providers=["CUDAExecutionProvider"])


@pytest.mark.parametrize("export", ["smollm2_fp32", "smollm2_fused_int4"])
def test_reuse_is_token_exact_on_smollm2(export: str, request: pytest.FixtureRequest) -> None:
    folder = request.getfixturevalue(export)
    model = _load(folder, 0)
    encode = model.tokenizer.encode
    shared = encode("You are a helpful assistant who answers in one short sentence. " * 6, add_special_tokens=False)
    tails = [encode(q, add_special_tokens=False) for q in ("What is 2+2?", "Name a color.", "What is 2+2?")]
    model.close()
    _token_exact(folder, shared, tails)


@pytest.mark.parametrize("export", ["smollm2_fp32", "smollm2_fused_int4"])
def test_repeated_prompts_arriving_together_are_not_read_again(export: str, request: pytest.FixtureRequest) -> None:
    """Prompts read whole before compute nothing: each first token comes from the logits kept with them, and
    they join the batch together (held back here while they queue, so that one admission finds them all), with
    every token as with the cache off (int8_decode_rows = 1: every decode step through the int8 graph, whose rows
    compute alike alone and batched on every CPU; the int4 graph's do not on AVX2-only ones)."""
    folder = request.getfixturevalue(export)
    off, on = _load(folder, 0, int8_decode_rows=1), _load(folder, 64, int8_decode_rows=1)
    try:
        encode, engine = on.tokenizer.encode, on.generator
        prompts = [encode(f"Question {i}: " + "why is the sky blue? " * i, add_special_tokens=False)
                   for i in range(1, 5)]
        expected = [_greedy(off, p)[0] for p in prompts]
        assert [_greedy(on, p) for p in prompts] == [(ids, 0) for ids in expected]  # read, and kept whole
        runs, whole = engine.stats.prefill_runs, engine.prefix_cache.stats.whole_hits

        async def together() -> list[tuple[list[int], int]]:
            async def one(prompt: list[int]) -> tuple[list[int], int]:
                ids, cached = [], 0
                request = GenerationRequest(prompt_ids=prompt, params=SamplingParams(temperature=0.0), max_tokens=12,
                                            ignore_eos=True)
                async for step in engine.generate(request):
                    ids += [t for d in step for t in d.token_ids]
                    cached = max([cached, *(d.cached_tokens for d in step)])
                return ids, cached

            with engine._wake:  # the engine thread waits for this lock (an RLock) to admit anything
                tasks = [asyncio.ensure_future(one(p)) for p in prompts]
                while len(engine._waiting) < len(prompts):
                    await asyncio.sleep(0)
            return list(await asyncio.gather(*tasks))

        assert asyncio.run(together()) == [(ids, len(p)) for ids, p in zip(expected, prompts, strict=True)]
        assert engine.stats.prefill_runs == runs and engine.prefix_cache.stats.whole_hits == whole + len(prompts)
    finally:
        off.close()
        on.close()


def test_an_answer_is_reused_by_the_next_turn(smollm2_fp32: Path) -> None:
    """A chat resends its history: the KV of the answer the model gave (not only of its prompt) is kept."""
    off, on = _load(smollm2_fp32, 0), _load(smollm2_fp32, 64)
    try:
        encode = on.tokenizer.encode
        first = encode("<|im_start|>user\nTell me about the sea.<|im_end|>\n<|im_start|>assistant\n",
                       add_special_tokens=False)
        answer, _ = _greedy(on, first, tokens=40)
        second = [*first, *answer, *encode("<|im_end|>\n<|im_start|>user\nAnd rivers?<|im_end|>\n",
                                           add_special_tokens=False)]
        expected, _ = _greedy(off, second)
        got, cached = _greedy(on, second)
        assert got == expected
        block = on.generator.prefix_cache.block
        kept = len(first) + len(answer) - 1  # the last answer token was sampled, never fed: no KV
        assert cached == kept // block * block > len(first)
    finally:
        off.close()
        on.close()


def test_a_store_that_fails_after_the_first_token_costs_only_the_reuse(smollm2_fp32: Path) -> None:
    """The prefix store copies a prompt's KV after its first token is sent and its rows have joined the batch: a
    fault there (memory, say) is logged, the request answers as it would have, and the engine serves on."""
    class Failing(PrefixCache):
        def store(self, ids: list[int], kv: list[np.ndarray], copies: object = None, logits: object = None) -> None:
            raise MemoryError("no room for the blocks")

    off, on = _load(smollm2_fp32, 0), _load(smollm2_fp32, 64)
    try:
        on.generator.prefix_cache = Failing(64 * 2**20)
        prompt = on.tokenizer.encode("The lighthouse keeper climbed the stairs and " * 8, add_special_tokens=False)
        expected, _ = _greedy(off, prompt)
        for _ in range(2):  # the second time, nothing was kept to reuse
            assert _greedy(on, prompt) == (expected, 0)
    finally:
        off.close()
        on.close()


def _kv(blocks: int, block: int = 4) -> list[np.ndarray]:
    return [np.full((2, blocks * block, 8), float(i), dtype=np.float32) for i in range(4)]


def test_eviction_keeps_the_budget_and_takes_leaves_before_their_prefixes() -> None:
    block_bytes = 4 * 2 * 4 * 8 * 4  # tensors x heads x tokens x dim x float32
    cache = PrefixCache(10 * block_bytes, block=4)
    base = list(range(1000, 1008))  # two blocks every prompt shares
    for i in range(20):  # each prompt adds two blocks of its own
        prompt = [*base, *range(i * 100, i * 100 + 8), 7]
        cache.store(prompt, _kv(4))
        assert cache.used_bytes <= cache.budget_bytes
    assert cache.blocks == 10
    assert cache.stats.stored_blocks == 4 + 19 * 2  # the shared blocks are stored once
    assert cache.stats.evicted_blocks == cache.stats.stored_blocks - cache.blocks
    # The shared prefix, touched by every prompt, survived; so did the newest prompts' own blocks.
    reused, past, _ = cache.match([*base, *range(1900, 1908), 7, 8])
    assert reused == 16 and past is not None and past[0].shape == (1, 2, 16, 8)
    assert cache.match([*base, *range(0, 8), 7, 8])[0] == 8  # an old prompt's own blocks are gone, not its prefix
    assert cache.match([1, 2, 3])[0] == 0


def test_blocks_copied_ahead_are_stored_as_the_store_would_copy_them() -> None:
    """The prefill thread copies a prompt's new blocks ahead (copy_blocks); storing with those copies keeps the
    same blocks as storing without, and blocks already held are not copied again."""
    prompt = list(range(20))
    kv = [np.arange(2 * 20 * 8, dtype=np.float32).reshape(2, 20, 8) + i for i in range(4)]
    plain, ahead = PrefixCache(1 << 20, block=4), PrefixCache(1 << 20, block=4)
    for cache in (plain, ahead):
        cache.store(prompt[:8], kv)
    copies = ahead.copy_blocks(prompt, kv)
    assert len(copies) == 3  # blocks 3 to 5: the first two are held
    ahead.store(prompt, kv, copies)
    plain.store(prompt, kv)
    assert ahead.blocks == plain.blocks == 5
    stored = {id(tensor) for block in ahead._blocks.values() for tensor in block.kv}
    assert all(id(tensor) in stored for copy in copies.values() for tensor in copy)
    for ours, theirs in zip(ahead.match([*prompt, 1, 2])[1], plain.match([*prompt, 1, 2])[1], strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_a_prompt_leaves_at_least_two_tokens_to_compute() -> None:
    cache = PrefixCache(1 << 20, block=4)
    prompt = list(range(8))
    cache.store(prompt, _kv(2))
    assert cache.match(prompt)[0] == 4  # the logits of the last token must be computed
    assert cache.match([*prompt, 99])[0] == 4  # and not in a one-token step, whose kernels round otherwise
    assert cache.match([*prompt, 99, 100])[0] == 8


def _ramp(tokens: int) -> list[np.ndarray]:
    return [np.arange(2 * tokens * 8, dtype=np.float32).reshape(2, tokens, 8) + 1000 * i for i in range(4)]


@pytest.mark.parametrize("length", [3, 8, 10])  # shorter than a block, whole blocks, blocks and an end
def test_a_prompt_read_whole_is_reused_whole_with_its_logits(length: int) -> None:
    """A prompt stored with its last token's logits is found whole: all its KV and those logits, nothing to
    compute. Any other prompt, even one that only extends it, reuses its blocks and computes two tokens or more."""
    cache = PrefixCache(1 << 20, block=4)
    prompt, kv, logits = list(range(100, 100 + length)), _ramp(12), np.linspace(-1, 1, 10, dtype=np.float32)
    cache.store(prompt, kv, logits=logits)
    match = cache.match(prompt, columns=16)
    assert match.tokens == length and match.past is not None and match.past[0].shape == (1, 2, 16, 8)
    np.testing.assert_array_equal(match.logits, logits)
    for ours, theirs in zip(match.past, kv, strict=True):
        np.testing.assert_array_equal(ours[0, :, :length], theirs[:, :length])
    assert cache.match(prompt).past[0].shape == (1, 2, length, 8)  # exact arrays
    for other in ([*prompt, 5], [*prompt, 5, 6], [*prompt[:-1], 99]):
        match = cache.match(other)
        assert match.logits is None and match.tokens == (len(other) - 2) // 4 * 4
    assert cache.stats.whole_hits == 2


def test_a_prompts_end_is_evicted_before_its_blocks() -> None:
    """An end is a leaf of its prompt's chain: under pressure it goes first, and the blocks still serve."""
    block_bytes = 4 * 2 * 4 * 8 * 4
    end_bytes = 4 * 2 * 2 * 8 * 4 + 10 * 4  # two tokens' KV, ten logits
    cache = PrefixCache(2 * block_bytes + end_bytes, block=4)
    prompt, logits = list(range(10)), np.zeros(10, dtype=np.float32)
    cache.store(prompt, _ramp(10), logits=logits)
    assert cache.used_bytes == cache.budget_bytes and cache.match(prompt).tokens == 10
    cache.store([50, 51], _ramp(2), logits=logits)  # an end of its own, as large: one must go
    assert cache.used_bytes == cache.budget_bytes and cache.stats.evicted_blocks == 1
    assert cache.match([50, 51]).tokens == 2
    match = cache.match(prompt)
    assert match.logits is None and match.tokens == 8


def test_a_held_sequence_hands_over_its_buffers_within_its_prompt() -> None:
    """The buffers of a lone sequence that left the batch serve the next prompt in place (no copy out of the
    blocks) when its cached prefix lies within that sequence's prompt and the room asked for fits; the next
    lookup lets go of them either way."""
    cache = PrefixCache(1 << 20, block=4)
    prompt = list(range(12))
    cache.store(prompt, _kv(3))
    buffers = [np.zeros((1, 2, 24, 8), dtype=np.float32) for _ in range(4)]
    cache.hold(prompt, buffers)
    reused, past, _ = cache.match([*prompt[:8], 50, 51, 52], columns=16)
    assert reused == 8 and past is buffers
    reused, past, _ = cache.match([*prompt[:8], 50, 51, 52], columns=16)
    assert reused == 8 and past is not buffers and past[0].shape == (1, 2, 16, 8)
    np.testing.assert_array_equal(past[1][0, :, :8], _kv(2)[1])
    for ids, columns, held in (([*prompt, 50, 51], 16, prompt[:8]),  # a prefix beyond the held prompt
                               ([*prompt[:8], 50, 51], 32, prompt),  # more room than the buffers have
                               ([*prompt[:8], 50, 51], None, prompt),  # exact arrays asked for
                               ([99, 98, 97, 96, 95, 94], 16, prompt)):  # no cached prefix: let go of all the same
        cache.hold(held, buffers)
        assert cache.match(ids, columns)[1] is not buffers
        assert cache.match([*prompt[:8], 50, 51], 16)[1] is not buffers


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


SYSTEM = "You are a patient tutor. " + " ".join(f"Guideline {i}: explain step {i} clearly." for i in range(40))


def _ask(client: openai.OpenAI, question: str, **options: object) -> object:
    return client.chat.completions.create(model=CHAT, temperature=0, max_tokens=16, **options,
                                          messages=[{"role": "system", "content": SYSTEM},
                                                    {"role": "user", "content": question}])


def test_cached_tokens_are_reported_in_usage_streamed_and_not(client: openai.OpenAI) -> None:
    first = _ask(client, "What is a prime number?")
    again = _ask(client, "What is a prime number?")
    assert again.choices[0].message.content == first.choices[0].message.content
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens  # read whole before
    chunks = list(_ask(client, "What is an even number?", stream=True, stream_options={"include_usage": True}))
    details = chunks[-1].usage.prompt_tokens_details
    assert 0 < details.cached_tokens < chunks[-1].usage.prompt_tokens
    completion = client.completions.create(model=CHAT, prompt=[SYSTEM + " One.", SYSTEM + " Two."], max_tokens=2)
    assert completion.usage.prompt_tokens_details.cached_tokens > 0


def test_requests_sharing_a_prefix_concurrently_answer_as_alone(client: openai.OpenAI) -> None:
    questions = [f"What is {i} times {i}?" for i in range(2, 7)]
    alone = {q: _ask(client, q).choices[0].message.content for q in questions}
    with concurrent.futures.ThreadPoolExecutor(len(questions)) as pool:
        together = dict(zip(questions, pool.map(lambda q: _ask(client, q).choices[0].message.content, questions),
                            strict=True))
    assert together == alone


def test_kv_memory_and_its_budgets_show_in_models_and_metrics(client: openai.OpenAI, server: Server) -> None:
    import httpx

    _ask(client, "What is a triangle?")
    card = client.models.retrieve(CHAT).model_extra
    assert card["kv_budget_bytes"] == 4096 * 2**20 and card["prefix_cache_budget_bytes"] == 1024 * 2**20
    assert 0 < card["prefix_cache_bytes"] <= card["prefix_cache_budget_bytes"]
    assert card["kv_cache_bytes"] == 0  # nothing decoding now
    metrics = httpx.get(f"{server.url}/metrics").text
    for name in ("fastllm_kv_budget_bytes", "fastllm_kv_cache_bytes", "fastllm_prefix_cache_hits",
                 "fastllm_prefix_cache_whole_hits",
                 "fastllm_prefix_cache_queries", "fastllm_prefix_cache_cached_tokens",
                 "fastllm_prefix_cache_evicted_blocks", "fastllm_decode_steps", "fastllm_decode_steps_int8"):
        assert f'{name}{{model="{CHAT}"}}' in metrics
