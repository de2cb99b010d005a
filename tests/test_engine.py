"""The engine in-process on the real SmolLM2 export: batching, cancellation, detokenization, sampling."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from fastllm.config import ModelConfig, RuntimeConfig
from fastllm.runtime.detokenize import IncrementalDetokenizer
from fastllm.runtime.generation import GenerationEngine, GenerationRequest
from fastllm.runtime.kv_cache import BatchCache
from fastllm.runtime.models import ServedModel, load_model
from fastllm.runtime.sampling import Sampler, SamplingParams
from fastllm.tokenization import ChatTemplate, Tokenizer
from fastllm.tokenization.chat_template import FALLBACK_TEMPLATE

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def smol(smollm2_fp32: Path) -> ServedModel:
    model = load_model(ModelConfig(model_id=str(smollm2_fp32)), RuntimeConfig(max_batch_size=8), Path("models"))
    yield model
    model.close()


def chat_ids(model: ServedModel, question: str) -> list[int]:
    assert model.chat_template is not None
    prompt = model.chat_template.render([{"role": "user", "content": question}])
    return model.tokenizer.encode(prompt, add_special_tokens=False)


async def collect(engine: GenerationEngine, request: GenerationRequest) -> list[str]:
    texts = [""] * request.n
    async for deltas in engine.generate(request):
        for delta in deltas:
            texts[delta.index] += delta.text
    return texts


def test_eight_concurrent_greedy_requests_equal_their_solo_runs(smol: ServedModel) -> None:
    engine = smol.generator
    assert engine is not None
    questions = ["What is 2+2?", "Name a planet.", "Why is the sky blue?", "Say hi in French.",
                 "What is the capital of Spain?", "List three animals.", "What is ice?", "Describe a cat."]
    requests = [GenerationRequest(chat_ids(smol, q), GREEDY, max_tokens=20 + 3 * i) for i, q in enumerate(questions)]

    async def solo() -> list[str]:
        return [(await collect(engine, r))[0] for r in requests]

    async def together() -> list[str]:
        results = await asyncio.gather(*(collect(engine, r) for r in requests))
        return [r[0] for r in results]

    alone = asyncio.run(solo())
    batched = asyncio.run(together())
    assert batched == alone
    assert engine.stats.running == 0


def test_batch_size_is_bounded_and_requests_queue(smollm2_fp32: Path) -> None:
    model = load_model(ModelConfig(model_id=str(smollm2_fp32)), RuntimeConfig(max_batch_size=2), Path("models"))
    engine = model.generator
    assert engine is not None
    seen: list[int] = []

    async def watch(done: asyncio.Event) -> None:
        while not done.is_set():
            seen.append(engine.stats.running)
            await asyncio.sleep(0.005)

    async def main() -> list[list[str]]:
        done = asyncio.Event()
        watcher = asyncio.create_task(watch(done))
        request = GenerationRequest(chat_ids(model, "Count to ten."), GREEDY, max_tokens=12, ignore_eos=True)
        results = await asyncio.gather(*(collect(engine, request) for _ in range(5)))
        done.set()
        await watcher
        return results

    try:
        results = asyncio.run(main())
    finally:
        model.close()
    assert max(seen) <= 2
    assert len({r[0] for r in results}) == 1


def test_cancelled_request_frees_its_slot(smol: ServedModel) -> None:
    engine = smol.generator
    assert engine is not None
    request = GenerationRequest(chat_ids(smol, "Tell me a story."), GREEDY, max_tokens=500, ignore_eos=True)

    async def main() -> int:
        stream = engine.generate(request)
        for _ in range(3):
            await anext(stream)
        await stream.aclose()
        for _ in range(200):
            if engine.stats.running == 0:
                break
            await asyncio.sleep(0.01)
        return engine.stats.running

    assert asyncio.run(main()) == 0


def test_n_choices_share_one_prefill_and_seeds_reproduce(smol: ServedModel) -> None:
    engine = smol.generator
    assert engine is not None
    params = SamplingParams(temperature=1.0, seed=7)
    request = GenerationRequest(chat_ids(smol, "Invent a name."), params, max_tokens=10, n=3)
    first = asyncio.run(collect(engine, request))
    second = asyncio.run(collect(engine, request))
    assert first == second
    assert len(set(first)) > 1  # different seeds per choice


def test_stop_token_ids_and_finish_reasons(smol: ServedModel) -> None:
    engine = smol.generator
    assert engine is not None

    async def finish(request: GenerationRequest) -> tuple[str, int]:
        reason, tokens = "", 0
        async for deltas in engine.generate(request):
            for d in deltas:
                tokens += len(d.token_ids)
                reason = d.finish_reason or reason
        return reason, tokens

    ids = chat_ids(smol, "What is the capital of France?")
    assert asyncio.run(finish(GenerationRequest(ids, GREEDY, max_tokens=100))) == ("stop", 8)
    assert asyncio.run(finish(GenerationRequest(ids, GREEDY, max_tokens=4))) == ("length", 4)


TRICKY = "Café naïve — 日本語のテキスト 🍂🎉 👩‍👩‍👧 done."


def test_incremental_detokenization_is_exact_for_multibyte_text(smol: ServedModel) -> None:
    ids = smol.tokenizer.encode(TRICKY, add_special_tokens=False)
    detok = IncrementalDetokenizer(smol.tokenizer)
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.flush())
    assert "".join(pieces) == TRICKY == smol.tokenizer.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("stop", ["テキスト", "é na", "🎉", "done."])
def test_stop_strings_are_found_across_token_boundaries(smol: ServedModel, stop: str) -> None:
    ids = smol.tokenizer.encode(TRICKY, add_special_tokens=False)
    detok = IncrementalDetokenizer(smol.tokenizer, stop=[stop, "never-seen"])
    pieces = []
    for i in ids:
        pieces.append(detok.add(i))
        if detok.stopped:
            break
    pieces.append(detok.flush())
    assert detok.stopped
    assert "".join(pieces) == TRICKY[: TRICKY.index(stop)]


def test_chat_template_is_the_models_own_and_fallback_is_the_seeds(smol: ServedModel) -> None:
    assert smol.chat_template is not None
    prompt = smol.chat_template.render([{"role": "user", "content": "hi"}])
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    plain = ChatTemplate(FALLBACK_TEMPLATE, bos_token=None, eos_token=None)
    rendered = plain.render([{"role": "system", "content": "You are a helpful assistant."},
                             {"role": "user", "content": "What is 2+2?"}])
    assert rendered == "system: You are a helpful assistant.\nuser: What is 2+2?\nassistant:"


def test_template_folder_without_a_template_uses_the_fallback(tmp_path: Path, smollm2_fp32: Path) -> None:
    tokenizer = Tokenizer(smollm2_fp32)
    template = ChatTemplate.for_model(tmp_path, {}, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)
    assert template.render([{"role": "user", "content": "x"}]) == "user: x\nassistant:"


# ---- sampling on synthetic logits ---------------------------------------------------------------

LOGITS = np.log(np.asarray([0.5, 0.3, 0.15, 0.05], dtype=np.float32))


def draws(params: SamplingParams, count: int = 400, logits: np.ndarray = LOGITS) -> list[int]:
    sampler = Sampler(params, prompt_ids=[])
    return [sampler.sample(logits)[0] for _ in range(count)]


def test_greedy_top_k_one_and_min_p_one_pick_the_argmax() -> None:
    assert set(draws(SamplingParams(temperature=0.0))) == {0}
    assert set(draws(SamplingParams(temperature=1.0, top_k=1, seed=1))) == {0}
    assert set(draws(SamplingParams(temperature=1.0, min_p=0.99, seed=1))) == {0}


def test_top_p_and_top_k_cut_the_tail() -> None:
    assert set(draws(SamplingParams(top_p=0.7, seed=3))) == {0, 1}
    assert set(draws(SamplingParams(top_k=3, seed=3))) == {0, 1, 2}
    assert set(draws(SamplingParams(min_p=0.5, seed=3))) == {0, 1}  # 0.15 < 0.5 * 0.5


def test_sampling_follows_the_distribution_and_seeds_reproduce() -> None:
    sample = draws(SamplingParams(seed=11), count=4000)
    freq = np.bincount(sample, minlength=4) / len(sample)
    assert np.allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    assert sample == draws(SamplingParams(seed=11), count=4000)
    assert sample != draws(SamplingParams(seed=12), count=4000)


def test_a_whole_vocabulary_is_sampled_as_numpy_would_and_never_a_masked_token() -> None:
    """Blocks of the inverse CDF (see sampling._inverse_cdf) across Qwen2.5's 152k vocabulary, most of it masked as a
    grammar masks it: the draws are numpy's ``choice`` for the same seed, and never a masked token."""
    rng = np.random.default_rng(5)
    logits = rng.normal(size=151_936).astype(np.float32)
    logits[rng.choice(logits.size, logits.size - 300, replace=False)] = -np.inf
    ours = draws(SamplingParams(temperature=0.7, seed=7), count=3000, logits=logits)
    probs = np.exp((logits - logits.max()) / 0.7).astype(np.float64)
    reference = np.random.default_rng(7)
    theirs = [int(reference.choice(logits.size, p=probs / probs.sum())) for _ in range(3000)]
    assert set(ours) <= set(np.flatnonzero(np.isfinite(logits)).tolist())
    assert np.mean(np.asarray(ours) == np.asarray(theirs)) > 0.995
    assert len(set(ours)) > 20
    logits[5] = np.nan  # a broken model's row is an error (the engine fails that request), not a token
    with pytest.raises(ValueError, match="cannot sample"):
        draws(SamplingParams(temperature=0.7, seed=7), count=1, logits=logits)


def test_logit_bias_and_penalties() -> None:
    assert set(draws(SamplingParams(temperature=0.0, logit_bias={3: 100.0}))) == {3}
    assert set(draws(SamplingParams(temperature=0.0, logit_bias={0: -100.0}))) == {1}
    # presence penalty: after token 0 was produced, a strong penalty moves greedy to token 1
    sampler = Sampler(SamplingParams(temperature=0.0, presence_penalty=2.0), prompt_ids=[])
    assert [sampler.sample(LOGITS)[0] for _ in range(2)] == [0, 1]
    sampler = Sampler(SamplingParams(temperature=0.0, frequency_penalty=0.3), prompt_ids=[])
    assert [sampler.sample(LOGITS)[0] for _ in range(3)][:2] == [0, 0]
    # repetition penalty counts prompt tokens too
    sampler = Sampler(SamplingParams(temperature=0.0, repetition_penalty=5.0), prompt_ids=[0])
    assert sampler.sample(np.asarray([2.0, 1.0, 0.0], dtype=np.float32))[0] == 1


def test_logprobs_are_the_models_before_penalties() -> None:
    sampler = Sampler(SamplingParams(temperature=0.0, logprobs=True, top_logprobs=2, logit_bias={1: 50.0}),
                      prompt_ids=[])
    token, logprob = sampler.sample(LOGITS)
    assert token == 1 and logprob is not None
    assert logprob.logprob == pytest.approx(np.log(0.3), abs=1e-5)
    assert [t for t, _ in logprob.top] == [0, 1]


# ---- the batch cache -----------------------------------------------------------------------------


def _kv(length: int, value: float, rows: int = 1) -> list[np.ndarray]:
    return [np.full((rows, 2, length, 4), value, dtype=np.float32) for _ in range(2)]


def test_batch_cache_left_pads_joins_and_trims_on_leave() -> None:
    cache = BatchCache()
    cache.join(_kv(3, 1.0), [3])
    cache.join(_kv(5, 2.0, rows=2), [5, 5])
    assert cache.rows == 3 and cache.width == 5
    assert cache.next_mask().tolist() == [[0, 0, 1, 1, 1, 1], [1] * 6, [1] * 6]
    assert np.all(cache.past[0][0, :, :2] == 0) and np.all(cache.past[0][0, :, 2:] == 1.0)
    cache.step([np.concatenate([p, np.full((3, 2, 1, 4), 9.0, dtype=np.float32)], axis=2) for p in cache.past])
    cache.keep([0])
    assert cache.width == 4 and cache.next_mask().tolist() == [[1, 1, 1, 1, 1]]
    assert np.all(cache.past[0][0, :, :3] == 1.0) and np.all(cache.past[0][0, :, 3] == 9.0)
    assert cache.past[0].flags.c_contiguous
    cache.keep([])
    assert cache.rows == 0


def test_batch_cache_takes_a_batched_prefill_of_right_padded_rows() -> None:
    """A batched prefill's rows arrive padded to the longest prompt; each keeps its own length."""
    cache = BatchCache(right_padded=True)
    cache.join(_kv(4, 1.0), [4])
    cache.join(_kv(6, 2.0, rows=2), [2, 6])
    assert cache.lengths.tolist() == [4, 2, 6] and cache.width == 6
    assert cache.next_mask().tolist() == [[1] * 5 + [0] * 2, [1] * 3 + [0] * 4, [1] * 7]
    cache.keep([0, 1])
    assert cache.width == 4 and cache.lengths.tolist() == [4, 2]
    # n > 1 choices: one prefilled row joins several times.
    cache.join(_kv(3, 3.0), [3, 3], rows=[0, 0])
    assert cache.lengths.tolist() == [4, 2, 3, 3] and np.all(cache.past[1][2:, :, :3] == 3.0)


def test_batch_cache_right_pads_for_fused_graphs() -> None:
    cache = BatchCache(right_padded=True)
    cache.join(_kv(3, 1.0), [3])
    cache.join(_kv(5, 2.0), [5])
    assert cache.next_mask().tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6]
    assert np.all(cache.past[0][0, :, 3:] == 0) and np.all(cache.past[0][0, :, :3] == 1.0)
    cache.step([np.zeros((2, 2, 6, 4), dtype=np.float32)] * 2)
    assert cache.lengths.tolist() == [4, 6]
    cache.keep([0])
    assert cache.width == 4 and cache.next_mask().tolist() == [[1, 1, 1, 1, 1]]


def test_a_join_into_arrays_faulted_ahead_equals_one_that_allocates() -> None:
    """Arrays made ahead for a join (by the prefill thread) hold the same rows as the join's own; ones that no
    longer fit (the batch changed meanwhile) are passed over."""
    def batch() -> BatchCache:
        cache = BatchCache(right_padded=True, shared=True)
        cache.join(_kv(3, 1.0, rows=2), [3, 2])
        return cache

    assert BatchCache(right_padded=True, shared=True).faulted_join(_kv(9, 2.0), 1, 9) is None  # adopted as is
    assert BatchCache().faulted_join(_kv(9, 2.0), 1, 9) is None  # unshared caches are rebuilt whole
    plain, ahead = batch(), batch()
    into = ahead.faulted_join(_kv(12, 2.0), 1, 9)
    assert into is not None and into[0].shape[:3] == (3, 2, 9 + 64)
    ahead.join(_kv(12, 2.0), [9], into=into)
    plain.join(_kv(12, 2.0), [9])
    assert ahead.past[0] is into[0]
    assert ahead.lengths.tolist() == plain.lengths.tolist() == [3, 2, 9]
    for row, length in enumerate(plain.lengths):
        for ours, theirs in zip(ahead.past, plain.past, strict=True):
            np.testing.assert_array_equal(ours[row, :, :length], theirs[row, :, :length])
    stale = batch()
    into = stale.faulted_join(_kv(12, 2.0), 1, 9)
    stale.keep([0])  # a row finished before the join
    stale.join(_kv(12, 2.0), [9], into=into)
    assert stale.past[0] is not into[0] and stale.lengths.tolist() == [3, 9]


def test_shared_batch_cache_grows_buffers_and_keeps_rows_in_place() -> None:
    """Shared mode (fused graphs on the CPU): buffers carry spare columns the graph writes into."""
    cache = BatchCache(right_padded=True, shared=True)
    cache.join(_kv(3, 1.0), [3])
    buffers = cache.next_past()
    assert buffers[0].shape[2] >= 4 and cache.width == 3
    buffers[0][0, :, 3] = 7.0  # what the graph does in place: the fed token's key at column 3
    cache.step(buffers)
    assert cache.width == 4 and cache.next_mask().tolist() == [[1] * 5]
    cache.join(_kv(2, 2.0), [2])  # the spare columns of the old buffers are not carried as real ones
    assert cache.width == 4 and cache.lengths.tolist() == [4, 2]
    assert np.all(cache.past[0][0, :, 3] == 7.0) and np.all(cache.past[0][1, :, :2] == 2.0)
    assert cache.next_past()[0].shape[2] >= 5
    cache.keep([1])
    assert cache.width == 2 and cache.past[0].flags.c_contiguous
