"""Structured outputs: `response_format` and `structured_outputs`, enforced by llguidance inside the engine's step,
checked with the official `openai` client against the real server (SmolLM2-135M, sampled at temperature 1)."""

from __future__ import annotations

import concurrent.futures
import json
import re

import httpx
import jsonschema
import openai
import pydantic
import pytest
from serving import Server
from test_api_errors import assert_openai_error

CHAT = "SmolLM2-135M-Instruct"
PET = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "species": {"enum": ["cat", "dog", "bird"]},
    },
    "required": ["name", "age", "species"],
    "additionalProperties": False,
}
PET_FORMAT = {"type": "json_schema", "json_schema": {"name": "pet", "schema": PET, "strict": True}}
ASK_PET = [{"role": "user", "content": "Describe a pet as JSON with its name, age and species."}]


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server: Server) -> httpx.Client:
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_json_schema_answers_validate_when_sampled_at_temperature_one(client: openai.OpenAI, seed: int) -> None:
    reply = client.chat.completions.create(model=CHAT, messages=ASK_PET, temperature=1, seed=seed, max_tokens=120,
                                           response_format=PET_FORMAT)
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"  # complete: the grammar ended the answer, not max_tokens
    jsonschema.validate(json.loads(choice.message.content), PET)


def test_json_schema_streamed_and_with_several_choices(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model=CHAT, messages=ASK_PET, temperature=1, seed=7, max_tokens=120,
                                            response_format=PET_FORMAT, n=3, stream=True)
    texts, finishes = ["", "", ""], [None, None, None]
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            finishes[choice.index] = choice.finish_reason or finishes[choice.index]
    assert finishes == ["stop"] * 3
    for text in texts:
        jsonschema.validate(json.loads(text), PET)
    assert len(set(texts)) > 1  # each choice samples its own answer through its own copy of the grammar


def test_json_object_answers_are_objects(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Give me a small JSON object about Paris."}]
    stopped = 0
    for seed in range(4):
        reply = client.chat.completions.create(model=CHAT, messages=messages, temperature=1, seed=seed, max_tokens=150,
                                               response_format={"type": "json_object"})
        choice = reply.choices[0]
        if choice.finish_reason == "stop":  # a length cut is the only way to an incomplete document
            stopped += 1
            assert isinstance(json.loads(choice.message.content), dict)
    assert stopped >= 2


class Pet(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=24)
    age: int = pydantic.Field(ge=0, le=120)
    species: str


def test_parse_with_a_pydantic_model_sets_parsed(client: openai.OpenAI) -> None:
    completion = client.chat.completions.parse(model=CHAT, messages=ASK_PET, response_format=Pet, temperature=0.8,
                                               seed=3, max_tokens=120)
    message = completion.choices[0].message
    assert isinstance(message.parsed, Pet)
    assert 0 <= message.parsed.age <= 120


def test_structured_outputs_extension_regex_choice_and_lark(client: openai.OpenAI) -> None:
    ask = [{"role": "user", "content": "When was the Eiffel Tower built? Answer with a date."}]

    def answer(**constraint: object) -> str:
        reply = client.chat.completions.create(model=CHAT, messages=ask, temperature=1, seed=4, max_tokens=40,
                                               extra_body={"structured_outputs": constraint})
        assert reply.choices[0].finish_reason == "stop"
        return reply.choices[0].message.content

    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", answer(regex=r"\d{4}-\d{2}-\d{2}"))
    assert answer(choice=["yes", "no", "maybe"]) in {"yes", "no", "maybe"}
    lark = 'start: "Built in " YEAR "."\nYEAR: /1[0-9]{3}/'
    assert re.fullmatch(r"Built in 1\d{3}\.", answer(grammar=lark))


def test_legacy_completions_take_response_format(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=CHAT, prompt=["A pet, as JSON: ", "Another pet: "], temperature=1, seed=2,
                                      max_tokens=120, extra_body={"response_format": PET_FORMAT})
    assert [c.finish_reason for c in reply.choices] == ["stop", "stop"]
    for choice in reply.choices:
        jsonschema.validate(json.loads(choice.text), PET)


def test_constrained_and_free_rows_share_a_batch_without_changing_the_free_answer(client: openai.OpenAI) -> None:
    free = [{"role": "user", "content": "Write a sentence about the sea."}]
    alone = client.chat.completions.create(model=CHAT, messages=free, temperature=0, max_tokens=40)
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        constrained = [pool.submit(client.chat.completions.create, model=CHAT, messages=ASK_PET, temperature=1,
                                   seed=seed, max_tokens=120, response_format=PET_FORMAT) for seed in range(4)]
        together = pool.submit(client.chat.completions.create, model=CHAT, messages=free, temperature=0,
                               max_tokens=40)
        for future in constrained:
            jsonschema.validate(json.loads(future.result().choices[0].message.content), PET)
        assert together.result().choices[0].message.content == alone.choices[0].message.content


def test_a_repeated_schema_is_compiled_once(client: openai.OpenAI, http: httpx.Client) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    before = _metric(http, "fastllm_grammars_compiled")
    for _ in range(3):
        reply = client.chat.completions.create(model=CHAT, messages=ASK_PET, max_tokens=20, temperature=0,
                                               response_format={"type": "json_schema",
                                                                "json_schema": {"name": "ok", "schema": schema}})
        assert json.loads(reply.choices[0].message.content) in ({"ok": True}, {"ok": False})
    assert _metric(http, "fastllm_grammars_compiled") == before + 1
    assert _metric(http, "fastllm_grammar_cache_hits") >= 2


def _metric(http: httpx.Client, name: str) -> float:
    line = next(line for line in http.get("/metrics").text.splitlines()
                if line.startswith(f'{name}{{model="{CHAT}"}}'))
    return float(line.rsplit(" ", 1)[1])


@pytest.mark.parametrize(("fields", "param"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "nonsense"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"$ref": "#/nowhere"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"grammar": "start: undefined_rule"}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}, "structured_outputs"),
])
def test_a_schema_or_grammar_that_cannot_be_enforced_is_a_400_naming_it(http: httpx.Client, fields: dict,
                                                                         param: str) -> None:
    response = http.post("/v1/chat/completions", json={"model": CHAT, "messages": ASK_PET, "max_tokens": 8, **fields})
    assert_openai_error(response, 400, param=param)
