"""Speculative decoding (prompt lookup): drafted tokens verified in one step leave every output as it was."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from serving import run_server

from fastllm.config import ModelConfig, RuntimeConfig
from fastllm.runtime.generation import GenerationRequest
from fastllm.runtime.models import ServedModel, load_model
from fastllm.runtime.sampling import SamplingParams
from fastllm.runtime.speculation import PromptLookupDrafter, TokenHistory

FUNCTION = '''def summarize(orders, currency="EUR"):
    """Total and average of the paid orders, in one currency."""
    total = 0.0
    count = 0
    for order in orders:
        if order.status != "paid":
            continue
        amount = order.amount
        if order.currency != currency:
            amount = convert(amount, order.currency, currency)
        total += amount
        count += 1
    average = total / count if count else 0.0
    return {"total": round(total, 2), "average": round(average, 2), "count": count}
'''
# Text that repeats, as code edits and quoting answers do: the continuation copies what came before, which is
# what prompt lookup drafts (SmolLM2-135M does not follow an edit instruction well enough to copy reliably).
EDIT = f"{FUNCTION}\n{FUNCTION}\n{FUNCTION.splitlines()[0]}\n"

def test_the_drafter_continues_the_latest_match_of_the_longest_tail() -> None:
    drafter = PromptLookupDrafter(4)
    history = np.asarray([1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 6, 2, 3], dtype=np.int64)
    assert drafter.draft(history, 10) == [7, 8, 5, 6]  # "2 3" last occurred before "7 8 5 6"
    assert drafter.draft(history, 2) == [7, 8]  # never past what the request may still generate
    assert drafter.draft(np.asarray([5, 6, 7, 8], dtype=np.int64), 4) == []  # the tail occurs nowhere else
    # Drafts double while all are accepted, up to the most allowed, and shrink to what a rejection left.
    assert [drafter.next_length(4, 4, 4), PromptLookupDrafter(6).next_length(4, 4, 4)] == [4, 6]
    assert PromptLookupDrafter(32).next_length(8, 8, 8) == 16
    assert [drafter.next_length(4, 4, 3), drafter.next_length(4, 4, 0)] == [3, 1]
    history = TokenHistory([4, 5])
    for token in range(100):
        history.append(token)
    assert history.tokens.tolist() == [4, 5, *range(100)]


def _load(folder: Path, speculative: str) -> ServedModel:
    return load_model(ModelConfig(model_id=str(folder), speculative=speculative), RuntimeConfig(threads=1),
                      folder.parent)


def _generate(model: ServedModel, prompt: list[int], params: SamplingParams, tokens: int, **options: object
              ) -> tuple[list[int], str]:
    async def run() -> tuple[list[int], str]:
        ids, text = [], ""
        request = GenerationRequest(prompt_ids=prompt, params=params, max_tokens=tokens, **options)
        async for step in model.generator.generate(request):
            for delta in step:
                ids += delta.token_ids
                text += delta.text
        return ids, text

    return asyncio.run(run())


@pytest.fixture(scope="module")
def models(smollm2_fused: Path) -> Iterator[tuple[ServedModel, ServedModel]]:
    plain, speculative = _load(smollm2_fused, "off"), _load(smollm2_fused, "ngram")
    yield plain, speculative
    plain.close()
    speculative.close()


def test_greedy_and_seeded_outputs_are_those_of_plain_decoding(models: tuple[ServedModel, ServedModel]) -> None:
    plain, speculative = models
    prompt = plain.tokenizer.encode(EDIT, add_special_tokens=False)
    engine = speculative.generator
    for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, seed=7)):
        expected = _generate(plain, prompt, params, 96, ignore_eos=True)
        steps, accepted = engine.stats.steps, engine.stats.accepted_tokens
        assert _generate(speculative, prompt, params, 96, ignore_eos=True) == expected
        assert engine.stats.accepted_tokens - accepted > 20  # it copied the function, several tokens a step
        assert engine.stats.steps - steps < 96 - 20
    assert plain.generator.stats.drafted_tokens == 0


def test_stops_and_the_token_limit_hold_inside_an_accepted_draft(models: tuple[ServedModel, ServedModel]) -> None:
    plain, speculative = models
    prompt = plain.tokenizer.encode(EDIT, add_special_tokens=False)
    greedy = SamplingParams(temperature=0.0)
    full_ids, full = _generate(plain, prompt, greedy, 60, ignore_eos=True)
    for limit in (1, 7, 23):  # cut anywhere, including within a step's accepted drafts
        ids, _ = _generate(speculative, prompt, greedy, limit, ignore_eos=True)
        assert ids == full_ids[:limit]
    stop = "# \n# \n# "  # within the repeated lines, which are drafted
    assert stop in full
    _, text = _generate(speculative, prompt, greedy, 60, ignore_eos=True, stop=[stop])
    assert text == full[: full.index(stop)]


def test_a_batch_decodes_as_before_and_an_opted_out_request_drafts_nothing(
        models: tuple[ServedModel, ServedModel]) -> None:
    plain, speculative = models
    prompt = plain.tokenizer.encode(EDIT, add_special_tokens=False)
    greedy = SamplingParams(temperature=0.0)
    expected = _generate(plain, prompt, greedy, 40, ignore_eos=True)

    async def together() -> list[list[int]]:
        async def one(**options: object) -> list[int]:
            ids: list[int] = []
            request = GenerationRequest(prompt_ids=prompt, params=greedy, max_tokens=40, ignore_eos=True, **options)
            async for step in speculative.generator.generate(request):
                ids += [t for d in step for t in d.token_ids]
            return ids
        return list(await asyncio.gather(one(), one(), one(speculative=False)))

    assert asyncio.run(together()) == [expected[0]] * 3
    drafted = speculative.generator.stats.drafted_tokens
    assert _generate(speculative, prompt, greedy, 40, ignore_eos=True, speculative=False) == expected
    assert speculative.generator.stats.drafted_tokens == drafted


def test_the_server_reports_acceptance_and_honours_the_opt_out(smollm2_fused: Path, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[model]\nmodel_id = "{smollm2_fused}"\nserved_model_name = "smol"\nspeculative = "ngram"\n')
    with run_server(["--config", str(config)], log_dir=tmp_path) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")

        def counters() -> tuple[float, float]:
            text = httpx.get(f"{server.url}/metrics").text
            read = [re.search(rf'fastllm_speculative_{name}{{model="smol"}} (\S+)', text) for name in
                    ("drafted_tokens", "accepted_tokens")]
            assert all(read)
            return float(read[0].group(1)), float(read[1].group(1))

        answer = client.completions.create(model="smol", prompt=EDIT, max_tokens=64, temperature=0,
                                           extra_body={"ignore_eos": True})
        drafted, accepted = counters()
        assert answer.usage.completion_tokens == 64 and 20 < accepted <= drafted
        streamed = client.completions.create(model="smol", prompt=EDIT, max_tokens=64, temperature=0, stream=True,
                                             extra_body={"ignore_eos": True, "speculative": False})
        assert "".join(c.choices[0].text for c in streamed) == answer.choices[0].text
        assert counters() == (drafted, accepted)


# --- a draft model (speculative = "draft") ------------------------------------------------------------------


def _load_drafting(folder: Path, draft: Path, tokens: int = 32) -> ServedModel:
    return load_model(ModelConfig(model_id=str(folder), speculative="draft", draft_model=str(draft),
                                  speculative_tokens=tokens), RuntimeConfig(threads=1), folder.parent)


def test_the_model_drafter_drafts_its_models_greedy_tokens_and_rolls_back_rejections(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Drafts are the draft model's own greedy continuation, also after the served model rejected some of them:
    its cache is cut back to the tokens kept, and what was sampled instead is fed on top."""
    from itertools import islice

    from conftest import tiny_export

    from fastllm.manifest import read_manifest
    from fastllm.runtime import draft_model
    from fastllm.runtime.decoder import Decoder
    from fastllm.runtime.draft_model import ModelDrafter
    from fastllm.runtime.generation import greedy_tokens

    monkeypatch.setattr(draft_model, "_CHUNK", 64)  # the tiny model's context is 256 tokens
    folder = tiny_export("llama", graph="fused")
    manifest = read_manifest(folder)
    drafter = ModelDrafter(Decoder(folder, manifest, threads=1), 8, manifest.context_length)
    reference = Decoder(folder, manifest, threads=1)

    def greedy(history: list[int], count: int) -> list[int]:
        return list(islice(greedy_tokens(reference, history), count))

    history = [(7 * i) % 50 + 5 for i in range(150)]  # longer than a chunk: caught up on in three steps
    drafts = drafter.draft(np.asarray(history, dtype=np.int64), 5)
    assert drafts == greedy(history, 5)
    history += [*drafts[:2], (drafts[2] + 1) % 50 + 5]  # two accepted, then another token sampled
    assert drafter.draft(np.asarray(history, dtype=np.int64), 4) == greedy(history, 4)
    history += drafter.draft(np.asarray(history, dtype=np.int64), 3)  # all accepted: only the last is new
    history.append(11)
    assert drafter.draft(np.asarray(history, dtype=np.int64), 3) == greedy(history, 3)
    assert drafter.draft(np.asarray([9, 10, 11], dtype=np.int64), 2) == greedy([9, 10, 11], 2)  # a new sequence
    assert [drafter.next_length(4, 4, 4), drafter.next_length(8, 8, 8), drafter.next_length(4, 4, 1)] == [5, 8, 2]
    drafter.close()


def test_a_draft_model_leaves_greedy_and_seeded_outputs_as_they_were() -> None:
    """A tiny Qwen2 served with a tiny Llama drafting (the same tokenizer, another model): most drafts are
    rejected, which exercises the rollback on every step, and the outputs stay plain decoding's."""
    from conftest import tiny_export

    target, draft = tiny_export("qwen2", graph="fused"), tiny_export("llama", graph="fused")
    plain, drafting = _load(target, "off"), _load_drafting(target, draft)
    try:
        prompt = [(3 * i) % 40 + 5 for i in range(30)]
        for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=0.9, seed=5)):
            assert _generate(drafting, prompt, params, 48, ignore_eos=True) == \
                _generate(plain, prompt, params, 48, ignore_eos=True)
        assert drafting.generator.stats.drafted_tokens > 40
    finally:
        plain.close()
        drafting.close()


def test_a_model_drafting_for_itself_is_accepted_and_changes_nothing(
        models: tuple[ServedModel, ServedModel], smollm2_fused: Path) -> None:
    plain = models[0]
    drafting = _load_drafting(smollm2_fused, smollm2_fused, tokens=8)
    try:
        prompt = plain.tokenizer.encode(plain.chat_template.render(
            [{"role": "user", "content": "Tell me about Paris."}]), add_special_tokens=False)
        greedy = SamplingParams(temperature=0.0)
        expected = _generate(plain, prompt, greedy, 64, ignore_eos=True)
        engine = drafting.generator
        assert _generate(drafting, prompt, greedy, 64, ignore_eos=True) == expected
        assert engine.stats.accepted_tokens >= 0.9 * engine.stats.drafted_tokens > 0
        assert engine.stats.steps < 64 / 3
    finally:
        drafting.close()


def test_a_draft_model_must_share_the_tokenizer_and_be_named(smollm2_fused: Path) -> None:
    from conftest import tiny_export

    from fastllm.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="does not share"):
        _load_drafting(smollm2_fused, tiny_export("llama", graph="fused"))
    with pytest.raises(ModelLoadError, match="needs draft_model"):
        load_model(ModelConfig(model_id=str(smollm2_fused), speculative="draft"), RuntimeConfig(threads=1),
                   smollm2_fused.parent)
