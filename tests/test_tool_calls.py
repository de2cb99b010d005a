"""Tool calling: each model family's call syntax read back into OpenAI's `tool_calls`, calls enforced by grammar,
on Qwen2.5-Coder-0.5B-Instruct (a template that renders tools) and SmolLM2 (one that does not)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import numpy as np
import openai
import pytest
from serving import Server, run_server
from test_api_errors import assert_openai_error

from fastllm.runtime.grammar import Grammar, GrammarCompiler
from fastllm.tokenization.chat_template import ChatTemplate
from fastllm.tokenization.tool_calls import (
    FALLBACK,
    HERMES,
    LLAMA3_JSON,
    MISTRAL,
    ToolCallStream,
    ToolCallSyntax,
    detect_syntax,
)

WEATHER = {
    "name": "get_weather",
    "description": "Get the current weather in a given city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city name"}},
                   "required": ["city"], "additionalProperties": False},
}
TIME = {
    "name": "get_time",
    "description": "Get the local time in a given time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]},
}
TOOLS = [{"type": "function", "function": WEATHER}, {"type": "function", "function": TIME}]
TOKYO = [{"role": "user", "content": "What is the weather in Tokyo? Answer in one sentence."}]


# ---- reading calls back, per syntax --------------------------------------------------------------------


@pytest.mark.parametrize(("syntax", "text", "content", "calls"), [
    (HERMES, 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
             '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>',
     "Let me look.", [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]),
    (HERMES, '```json\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n```', None,
     [("get_weather", {"city": "Oslo"})]),
    (HERMES, '{"name": "get_time", "arguments": {"zone": "UTC"}}', None, [("get_time", {"zone": "UTC"})]),
    (HERMES, "Paris is sunny {or so they say} today.", "Paris is sunny {or so they say} today.", []),
    (HERMES, "```python\nprint({1: 2})\n```", "```python\nprint({1: 2})\n```", []),
    (MISTRAL, '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Rome"}}, '
              '{"name": "get_time", "arguments": {"zone": "CET"}}]', None,
     [("get_weather", {"city": "Rome"}), ("get_time", {"zone": "CET"})]),
    (LLAMA3_JSON, '{"name": "get_weather", "parameters": {"city": "Lima"}}; {"name": "get_time", "parameters": {}}',
     None, [("get_weather", {"city": "Lima"}), ("get_time", {})]),
    (LLAMA3_JSON, "It is sunny in Lima.", "It is sunny in Lima.", []),
    (FALLBACK, '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Kyiv\\"}"}\n</tool_call>', None,
     [("get_weather", {"city": "Kyiv"})]),
])
def test_each_syntax_reads_back_content_and_calls(syntax: ToolCallSyntax, text: str, content: str | None,
                                                  calls: list[tuple[str, dict]]) -> None:
    parsed_content, parsed = syntax.parse(text)
    assert parsed_content == content
    assert [(c.name, json.loads(c.arguments)) for c in parsed] == calls
    assert all(c.id.startswith("call_") for c in parsed)
    assert len({c.id for c in parsed}) == len(parsed)
    # Streamed a few characters at a time, the same content and calls come out (each call's name first, then
    # its arguments in pieces that join to the same JSON), and no call syntax leaks.
    for size in (1, 3, 7):
        stream = ToolCallStream(syntax)
        streamed, names, arguments = "", {}, {}
        for at in range(0, len(text) + 1, size):
            piece, deltas = stream.feed(text[at:at + size]) if at < len(text) else stream.finish()
            streamed += piece
            for delta in deltas:
                if delta.id is not None:
                    assert delta.index == len(names) and delta.index not in arguments
                    names[delta.index] = delta.name
                arguments[delta.index] = arguments.get(delta.index, "") + delta.arguments
        assert streamed == (content or "")
        assert [(names[i], json.loads(arguments[i])) for i in sorted(names)] == calls
        assert [a for _, a in sorted(arguments.items())] == [c.arguments for c in parsed]


def test_the_syntax_comes_from_the_template_not_the_model_name(qwen_coder_int4: Path,
                                                              smollm2_fp32: Path) -> None:
    qwen = ChatTemplate.for_model(qwen_coder_int4, {}, bos_token=None, eos_token=None)
    smol = ChatTemplate.for_model(smollm2_fp32, json.loads((smollm2_fp32 / "tokenizer_config.json").read_text()),
                                  bos_token=None, eos_token=None)
    assert detect_syntax(qwen.source, renders_tools=qwen.renders_tools) is HERMES
    assert detect_syntax(smol.source, renders_tools=smol.renders_tools) is FALLBACK
    mistral = "{% for m in messages %}{% if m.tool_calls %}[TOOL_CALLS] {{ m.tool_calls | tojson }}{% endif %}" \
              "{% endfor %}{{ tools }}"
    assert detect_syntax(mistral, renders_tools=True) is MISTRAL
    llama = '<|start_header_id|>user<|end_header_id|>{{ tools }} {"name": function name, "parameters": ' \
            'dictionary of argument name and its value}'
    assert detect_syntax(llama, renders_tools=True) is LLAMA3_JSON
    assert detect_syntax(qwen.source, renders_tools=True, override="llama3_json") is LLAMA3_JSON


# ---- the grammars, on a real tokenizer -------------------------------------------------------------------


@pytest.fixture(scope="module")
def compiler(smollm2_fp32: Path) -> GrammarCompiler:
    manifest = json.loads((smollm2_fp32 / "fastllm.json").read_text())
    return GrammarCompiler(smollm2_fp32 / "tokenizer.json", vocab_size=manifest["vocab_size"],
                           eos_token_ids=manifest["eos_token_ids"])


def _follows(compiler: GrammarCompiler, lark: str, text: str) -> bool:
    """Whether the grammar lets a model write ``text`` (token by token, as SmolLM2's tokenizer splits it)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(compiler._tokenizer_json))
    matcher = compiler.compile(Grammar(json.dumps({"grammars": [{"lark_grammar": lark}]}), "tools")).matcher()
    for token in tokenizer.encode(text, add_special_tokens=False).ids:
        if not np.isfinite(matcher.mask(np.zeros(compiler._vocab_size, dtype=np.float32))[token]):
            return False
        matcher.accept(token)
    return True


@pytest.mark.parametrize(("syntax", "choice", "text", "allowed"), [
    (HERMES, "required", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', True),
    (HERMES, "required", "Sure, here you go", False),
    (HERMES, "required", '<tool_call>\n{"name": "get_weather", "arguments": {"town": "Paris"}}', False),
    (HERMES, "required", '<tool_call>\n{"name": "delete_everything", "arguments": {}}', False),
    (HERMES, "auto", "It is sunny. <tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"zone\": 5}}", False),
    (HERMES, "auto", "It is sunny. <tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"zone\": \"CET\"}}", True),
    (HERMES, "auto", "Any free text, even {braces} and ```code```.", True),
    (HERMES, "auto", '```json\n{"name": "get_weather", "arguments": {"city": 1}}', False),
    (HERMES, "none", '{"name": "get_weather"', False),
    (HERMES, "none", "<tool_call>", False),
    (HERMES, "none", "The weather is fine.", True),
    (LLAMA3_JSON, "auto", '{"name": "get_weather", "parameters": {"city": "Lima"}}; {"name": "get_time", "parameters": '
                          '{"zone": "C', True),
    (LLAMA3_JSON, "auto", '{"name": "get_weather", "arguments": {', False),
    (LLAMA3_JSON, "auto", "It is sunny in Lima.", True),
])
def test_grammars_enforce_calls_to_offered_tools_with_valid_arguments(compiler: GrammarCompiler,
                                                                      syntax: ToolCallSyntax, choice: str,
                                                                      text: str, allowed: bool) -> None:
    lark = syntax.lark([WEATHER, TIME], choice=choice, parallel=True, start_token=None)
    assert _follows(compiler, lark, text) is allowed


def test_mistral_calls_open_with_their_special_token(compiler: GrammarCompiler) -> None:
    # SmolLM2 has no [TOOL_CALLS]; its special <|im_start|> (id 1) stands in for the opener.
    lark = MISTRAL.lark([WEATHER], choice="required", parallel=False, start_token=1)
    assert not _follows(compiler, lark, "[TOOL_CALLS]")  # the text is not the special token
    assert _follows(compiler, lark, '<|im_start|> [{"name": "get_weather", "arguments": {"city": "Rome"}}]')
    assert not _follows(compiler, lark, '<|im_start|> [{"name": "get_weather", "arguments": {"city": "Rome"}}, {')


# ---- Qwen2.5-Coder-0.5B-Instruct: its template renders tools, it writes <tool_call> ----------------------


@pytest.fixture(scope="module")
def qwen(qwen_coder_int4: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    folder = tmp_path_factory.mktemp("qwen")
    with run_server(["--model", str(qwen_coder_int4), "--served-model-name", "qwen"], log_dir=folder) as running:
        yield openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0, timeout=120)


def _check_calls(calls: list, names: set[str]) -> None:
    assert calls
    schemas = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}, "auto"])
def test_qwen_calls_tools_for_required_named_and_auto_choices(qwen: openai.OpenAI, choice: object) -> None:
    reply = qwen.chat.completions.create(model="qwen", messages=TOKYO, tools=TOOLS, tool_choice=choice,
                                         temperature=0, max_tokens=80)
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "tool_calls"
    assert message.content is None
    named = choice["function"]["name"] if isinstance(choice, dict) else None
    _check_calls(message.tool_calls, {named} if named else {"get_weather", "get_time"})
    if named:
        assert len(message.tool_calls) == 1


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_qwen_required_calls_validate_when_sampled(qwen: openai.OpenAI, seed: int) -> None:
    reply = qwen.chat.completions.create(model="qwen", messages=TOKYO, tools=TOOLS, tool_choice="required",
                                         temperature=1, seed=seed, max_tokens=200, n=2, parallel_tool_calls=False)
    for choice in reply.choices:
        assert choice.finish_reason == "tool_calls"
        assert len(choice.message.tool_calls) == 1
        _check_calls(choice.message.tool_calls, {"get_weather", "get_time"})
    # With parallel calls allowed, a sampled model may call again and again: every call it finished validates
    # (a max_tokens cut leaves the last one unfinished, as OpenAI's do).
    reply = qwen.chat.completions.create(model="qwen", messages=TOKYO, tools=TOOLS, tool_choice="required",
                                         temperature=1, seed=seed, max_tokens=120, n=2)
    for choice in reply.choices:
        assert choice.finish_reason in ("tool_calls", "length")
        calls = choice.message.tool_calls
        _check_calls(calls if choice.finish_reason == "tool_calls" else calls[:-1] or calls,
                     {"get_weather", "get_time"})


@pytest.mark.parametrize("choice", ["required", "auto"])
def test_qwen_streams_tool_calls_as_openai_does(qwen: openai.OpenAI, choice: str) -> None:
    plain = qwen.chat.completions.create(model="qwen", messages=TOKYO, tools=TOOLS, tool_choice=choice,
                                         temperature=0, max_tokens=80)
    chunks = list(qwen.chat.completions.create(model="qwen", messages=TOKYO, tools=TOOLS, tool_choice=choice,
                                               temperature=0, max_tokens=80, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert not any(d.content for d in deltas)  # no raw call syntax leaks into content
    pieces = [call for d in deltas for call in d.tool_calls or []]
    first = pieces[0]
    assert first.index == 0 and first.id.startswith("call_") and first.type == "function"
    assert first.function.name == plain.choices[0].message.tool_calls[0].function.name
    arguments = "".join(p.function.arguments or "" for p in pieces if p.index == 0)
    assert json.loads(arguments) == json.loads(plain.choices[0].message.tool_calls[0].function.arguments)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_qwen_round_trip_from_question_to_call_to_result_to_answer(qwen: openai.OpenAI) -> None:
    messages: list[dict] = [*TOKYO]
    first = qwen.chat.completions.create(model="qwen", messages=messages, tools=TOOLS, temperature=0, max_tokens=80)
    call = first.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    messages.append(first.choices[0].message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp_c": 18, "sky": "cloudy"})})
    # An agent's last turn: tools still offered, but the model is to answer now.
    answer = qwen.chat.completions.create(model="qwen", messages=messages, tools=TOOLS, tool_choice="none",
                                          temperature=0, max_tokens=60)
    choice = answer.choices[0]
    assert choice.finish_reason == "stop" and choice.message.tool_calls is None
    assert "18" in choice.message.content and "{" not in choice.message.content


def test_qwen_with_tool_choice_none_answers_in_text(qwen: openai.OpenAI) -> None:
    reply = qwen.chat.completions.create(model="qwen", messages=TOKYO, tools=TOOLS, tool_choice="none",
                                         temperature=0, max_tokens=40)
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].message.content
    assert "<tool_call>" not in reply.choices[0].message.content


# ---- SmolLM2: a template without tools gets them in its system prompt ------------------------------------


def test_a_template_without_tools_gets_the_fallback_and_still_calls(server: Server) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    reply = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=TOKYO, tools=TOOLS,
                                           tool_choice="required", temperature=0, max_tokens=80)
    assert reply.choices[0].finish_reason == "tool_calls"
    _check_calls(reply.choices[0].message.tool_calls, {"get_weather", "get_time"})
    history = [*TOKYO, reply.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": reply.choices[0].message.tool_calls[0].id, "content": "18 C"}]
    answer = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=history, tools=TOOLS,
                                            tool_choice="none", temperature=0, max_tokens=30)
    assert answer.choices[0].message.content and answer.choices[0].message.tool_calls is None


@pytest.mark.parametrize(("fields", "param"), [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [*TOOLS, TOOLS[0]]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, None),
    ({"messages": [*TOKYO, {"role": "tool", "content": "18 C"}]}, "messages[1].tool_call_id"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
        "name": "get_weather", "arguments": "not json"}}]}]}, "messages[0].tool_calls[0].function.arguments"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": [{"id": "c1", "type": "function", "function": {
        "name": "get_weather", "arguments": "{}"}}]}]}, "messages[0].tool_calls"),
])
def test_bad_tool_requests_are_400s_naming_the_field(server: Server, fields: dict, param: str | None) -> None:
    body = {"model": "SmolLM2-135M-Instruct", "messages": TOKYO, "max_tokens": 8, **fields}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    error = assert_openai_error(response, 400, param=param)
    assert error["type"] == "invalid_request_error"


# ---- Mistral's special-token opener and Llama 3's bare JSON, end to end on a tiny random model -----------

# (The tiny model's context is 256 tokens: the templates only count the tools.)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% if tools %}[AVAILABLE_TOOLS]{{ tools | length }}[/AVAILABLE_TOOLS]{% endif %}"
    "{% for m in messages %}{% if m.role == 'user' %}[INST]{{ m.content }}[/INST]"
    "{% elif m.tool_calls %}[TOOL_CALLS] {{ m.tool_calls | tojson }}{% else %}{{ m.content }}{% endif %}{% endfor %}"
)
LLAMA_TEMPLATE = (
    "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{% if m.tool_calls %}"
    '{% for c in m.tool_calls %}{"name": "{{ c.function.name }}", "parameters": {{ c.function.arguments | tojson }}}'
    "{% endfor %}{% else %}{{ m.content }}{% endif %}<|eot_id|>{% endfor %}{% if tools %}{{ tools | length }}"
    "{% endif %}<|start_header_id|>assistant<|end_header_id|>\n\n"
)
CITY = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
                                              "required": ["city"], "additionalProperties": False}}


@pytest.mark.parametrize(("template", "syntax"), [(MISTRAL_TEMPLATE, MISTRAL), (LLAMA_TEMPLATE, LLAMA3_JSON)])
def test_other_syntaxes_run_through_the_engine_on_a_tiny_model(tmp_path: Path, template: str,
                                                               syntax: ToolCallSyntax) -> None:
    """A random model cannot choose to call, but under `required` the grammar makes it: Mistral's opener must
    be the special token (kept through decoding), Llama's call the bare JSON with `parameters`."""
    import asyncio
    import shutil

    import msgspec
    from conftest import tiny_export

    from fastllm.config import ModelConfig, RuntimeConfig
    from fastllm.runtime.models import load_model
    from fastllm.server import requests
    from fastllm.server.schemas import ChatCompletionRequest

    folder = shutil.copytree(tiny_export("llama"), tmp_path / "model")
    (folder / "chat_template.jinja").write_text(template)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    pad = next(t for t in tokenizer["added_tokens"] if t["content"] == "<|pad|>")  # stands in for [TOOL_CALLS]
    pad["content"] = "[TOOL_CALLS]"
    tokenizer["model"]["vocab"]["[TOOL_CALLS]"] = tokenizer["model"]["vocab"].pop("<|pad|>")
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))

    model = load_model(ModelConfig(model_id=str(folder)), RuntimeConfig(threads=1), tmp_path)
    try:
        assert model.tool_syntax is syntax
        body = msgspec.json.decode(json.dumps({
            "model": "m", "messages": [{"role": "user", "content": "Weather in Rome?"}], "temperature": 1, "seed": 3,
            "max_tokens": 120, "tools": [{"type": "function", "function": CITY}], "tool_choice": "required",
        }), type=ChatCompletionRequest)

        async def answer() -> str:
            request, plan = await requests.chat_request(model, body, max_n=1)
            assert plan is not None and plan.syntax is syntax
            assert request.skip_special_tokens is (syntax is not MISTRAL)
            text = ""
            async for step in model.generator.generate(request):
                text += "".join(d.text for d in step)
            return text

        text = asyncio.run(answer())
    finally:
        model.close()
    assert text.startswith("[TOOL_CALLS] [" if syntax is MISTRAL else '{"name": "get_weather", "parameters": ')
    content, calls = syntax.parse(text)
    assert content is None and calls
    for call in calls:
        assert call.name == "get_weather"
        jsonschema.validate(json.loads(call.arguments), CITY["parameters"])
