"""The official `openai` client, unchanged, against the real server on 127.0.0.1."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import numpy as np
import openai
import pytest
from serving import Server
from tokenizers import Tokenizer

CHAT = "SmolLM2-135M-Instruct"
EMBED = "all-MiniLM-L6-v2"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_lists_both_served_models_with_runtime_facts(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {CHAT, EMBED}
    chat = client.models.retrieve(CHAT)
    assert chat.id == CHAT
    assert chat.model_extra["provider"] == "CPUExecutionProvider"
    assert chat.model_extra["task"] == "text-generation"
    assert models[EMBED].model_extra["task"] == "embedding"


def test_unknown_model_is_a_404_model_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such-model", messages=FRANCE)
    assert caught.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_greedy_chat_answers_paris_with_exact_usage(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=CHAT, messages=FRANCE, temperature=0, max_tokens=30)
    choice = reply.choices[0]
    assert "Paris" in choice.message.content
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    assert reply.model == CHAT
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    # SmolLM2's template adds its default system prompt: 37 tokens for this one question.
    assert reply.usage.prompt_tokens == 37


def test_streamed_deltas_concatenate_to_the_plain_answer(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Write a short poem about autumn leaves, with an emoji 🍂."}]
    plain = client.chat.completions.create(model=CHAT, messages=messages, temperature=0, max_tokens=48)
    stream = client.chat.completions.create(model=CHAT, messages=messages, temperature=0, max_tokens=48, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_max_tokens_stops_with_length_and_counts_exactly(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=CHAT, messages=FRANCE, max_tokens=3, temperature=0.7, seed=1)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 3


def test_max_completion_tokens_is_honoured(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=CHAT, messages=FRANCE, max_completion_tokens=2)
    assert reply.usage.completion_tokens == 2


def test_stop_string_is_cut_from_the_text(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=CHAT, messages=FRANCE, temperature=0, max_tokens=30, stop=["Paris"])
    assert reply.choices[0].finish_reason == "stop"
    assert "Paris" not in reply.choices[0].message.content
    assert reply.choices[0].message.content.startswith("The capital of France is")


def test_same_seed_same_output_and_n_choices(client: openai.OpenAI) -> None:
    kwargs = {"model": CHAT, "messages": FRANCE, "temperature": 1.0, "max_tokens": 12, "seed": 1234, "n": 3}
    first = client.chat.completions.create(**kwargs)
    second = client.chat.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.message.content for c in first.choices] == [c.message.content for c in second.choices]
    assert 3 <= first.usage.completion_tokens <= 36


def test_logprobs_and_top_logprobs(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=CHAT, messages=FRANCE, temperature=0, max_tokens=5, logprobs=True,
                                           top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for item in content:
        assert item.logprob <= 0
        assert len(item.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert item.top_logprobs[0].token == item.token
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob, abs=1e-5)
    assert "".join(i.token for i in content) == reply.choices[0].message.content


def test_logit_bias_forces_a_token(client: openai.OpenAI, smollm2_fp32: Path) -> None:
    tokenizer = Tokenizer.from_file(str(smollm2_fp32 / "tokenizer.json"))
    banana = tokenizer.encode(" banana", add_special_tokens=False).ids[0]
    reply = client.completions.create(model=CHAT, prompt="Q: Say something.\nA:", max_tokens=3, temperature=0,
                                      logit_bias={str(banana): 100})
    assert reply.choices[0].text == tokenizer.decode([banana] * 3)
    assert reply.usage.completion_tokens == 3
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=CHAT, prompt="x", logit_bias={"99999999": 1})
    assert caught.value.param == "logit_bias"


def test_completions_plain_stream_and_several_prompts(client: openai.OpenAI) -> None:
    prompt = "The three primary colors are"
    plain = client.completions.create(model=CHAT, prompt=prompt, max_tokens=10, temperature=0)
    assert plain.object == "text_completion"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=CHAT, prompt=prompt, max_tokens=10, temperature=0, stream=True) if c.choices)
    assert streamed == plain.choices[0].text
    several = client.completions.create(model=CHAT, prompt=[prompt, "Once upon a time"], max_tokens=6, temperature=0)
    assert [c.index for c in several.choices] == [0, 1]
    assert several.choices[0].text == client.completions.create(
        model=CHAT, prompt=prompt, max_tokens=6, temperature=0).choices[0].text


def test_completions_accept_token_ids_and_echo(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=CHAT, prompt=[504, 1029], max_tokens=3, temperature=0, echo=True)
    assert reply.usage.prompt_tokens == 2
    assert len(reply.choices[0].text) > 0


def test_embeddings_every_input_form(client: openai.OpenAI) -> None:
    one = client.embeddings.create(model=EMBED, input="The food was delicious and the waiter was friendly.")
    assert one.object == "list"
    vector = np.asarray(one.data[0].embedding)
    assert vector.shape == (384,)
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-4)
    many = client.embeddings.create(model=EMBED, input=["a cat", "a dog", "The food was delicious and the waiter was "
                                                                           "friendly."])
    assert [d.index for d in many.data] == [0, 1, 2]
    assert np.allclose(many.data[2].embedding, vector, atol=1e-4)
    floats = client.embeddings.create(model=EMBED, input="a cat", encoding_format="float")
    assert np.allclose(floats.data[0].embedding, many.data[0].embedding, atol=1e-5)
    ids = client.embeddings.create(model=EMBED, input=[[101, 1037, 4937, 102], [101, 1037, 3899, 102]])
    assert np.allclose(ids.data[0].embedding, many.data[0].embedding, atol=1e-4)
    assert ids.usage.prompt_tokens == 8
    single = client.embeddings.create(model=EMBED, input=[101, 1037, 4937, 102])
    assert len(single.data) == 1


def test_mixed_lengths_in_one_request_come_back_in_place_and_as_alone(client: openai.OpenAI) -> None:
    """One request's inputs are sorted by length and run in several batches of like lengths (length_batches):
    each vector still lands at its input's index, equal to that input embedded alone."""
    texts = [" ".join(["river"] * n) + f" {i}" for i, n in enumerate([90, 2, 40, 3, 120, 1, 60, 5, 2, 80])]
    together = client.embeddings.create(model=EMBED, input=texts).data
    assert [d.index for d in together] == list(range(len(texts)))
    for text, data in zip(texts, together, strict=True):
        alone = client.embeddings.create(model=EMBED, input=text).data[0].embedding
        assert np.allclose(data.embedding, alone, atol=1e-4)


def test_length_batches_cut_where_padding_costs_more_than_a_run() -> None:
    from fastllm.runtime.embedding import length_batches

    assert length_batches([5, 5, 6, 6, 100, 100], 32) == [range(0, 4), range(4, 6)]
    assert length_batches([10, 10, 11], 32) == [range(0, 3)]  # too little padding to pay for a second run
    assert [len(b) for b in length_batches([10] * 40, 16)] == [8, 16, 16]  # never above max_rows
    assert length_batches([], 8) == []


def test_similar_sentences_embed_closer_than_unrelated(client: openai.OpenAI) -> None:
    data = client.embeddings.create(model=EMBED, input=["How do I bake bread?", "Bread baking instructions",
                                                        "The stock market fell today."]).data
    a, b, c = (np.asarray(d.embedding) for d in data)
    assert a @ b > a @ c + 0.2


def test_chat_to_embedding_model_and_reverse_are_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=EMBED, messages=FRANCE)
    assert caught.value.code == "wrong_model_type"
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=CHAT, input="hello")


def test_prompt_longer_than_context_is_a_400_with_the_numbers(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=CHAT, messages=FRANCE, max_tokens=9000)
    message = str(caught.value)
    assert "8192" in message and "9000" in message
    assert caught.value.code == "context_length_exceeded"


def test_concurrent_greedy_requests_match_their_solo_answers(client: openai.OpenAI) -> None:
    questions = ["What is 2+2?", "Name a color.", "What is the capital of Italy?", "Say hello.",
                 "What is water made of?", "Name a fruit.", "Count to three.", "What is the sun?"]

    def ask(question: str) -> str:
        reply = client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": question}],
                                               temperature=0, max_tokens=24)
        return reply.choices[0].message.content

    solo = [ask(q) for q in questions]
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        together = list(pool.map(ask, questions))
    assert together == solo


# The end of Qwen3's own chat template: `enable_thinking=False` pre-fills an empty thought.
QWEN3_TAIL = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def test_chat_template_kwargs_reach_the_template_as_vllm_passes_them(tmp_path: Path) -> None:
    """Qwen3's thinking switch: `extra_body={"chat_template_kwargs": {"enable_thinking": False}}`, as with vLLM.
    The variables the server sets itself (messages, tools, special tokens) cannot be replaced."""
    import shutil

    from conftest import tiny_export
    from serving import run_server

    folder = shutil.copytree(tiny_export("qwen3", graph="fused"), tmp_path / "qwen3")
    (folder / "chat_template.jinja").write_text(QWEN3_TAIL)
    with run_server(["--model", str(folder), "--served-model-name", "qwen3"], log_dir=tmp_path) as running:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0, timeout=120)

        def prompt_tokens(**extra: object) -> int:
            reply = client.chat.completions.create(model="qwen3", messages=FRANCE, max_tokens=1, **extra)
            assert reply.usage is not None
            return reply.usage.prompt_tokens

        thinking = prompt_tokens()
        assert prompt_tokens(extra_body={"chat_template_kwargs": {"enable_thinking": True}}) == thinking
        assert prompt_tokens(extra_body={"chat_template_kwargs": {"enable_thinking": False}}) > thinking
        with pytest.raises(openai.BadRequestError) as refused:
            prompt_tokens(extra_body={"chat_template_kwargs": {"messages": []}})
        assert refused.value.status_code == 400
        assert refused.value.body["param"] == "chat_template_kwargs"
        assert "cannot set messages" in refused.value.body["message"]
