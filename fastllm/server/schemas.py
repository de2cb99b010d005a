"""Request and response bodies, in OpenAI's shapes, as msgspec Structs.

Range checks live in the types (``Meta``), so a bad value is rejected by the decoder with the field's
name before any handler runs. Unknown fields are ignored, as OpenAI and vLLM do, so newer clients
that send fields we do not implement still work.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

# Litestar's OpenAPI generator drops bounds of 0 (it tests them for truth) and every constraint inside a union.
# `_documented` restates them for /docs/openapi.json (msgspec still does the checking), so clients and the
# schema fuzzing in tests/test_reliability_fuzz.py see what the server really accepts.


def _documented(**schema: object) -> Meta:
    return Meta(extra_json_schema={"extra": schema})


_TEXT = {"type": "string", "minLength": 1}
_TOKEN_ID = {"type": "integer", "minimum": 0}
_STOP = {"type": "string", "maxLength": 256}

Temperature = Annotated[float, Meta(ge=0.0, le=2.0), _documented(minimum=0.0)]
Probability = Annotated[float, Meta(ge=0.0, le=1.0), _documented(minimum=0.0)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
PositiveInt = Annotated[int, Meta(ge=1)]
TopLogprobs = Annotated[int, Meta(ge=0, le=20), _documented(minimum=0)]
# Token ids are non-negative; the model's vocabulary bound is checked once the model is known.
TokenId = Annotated[int, Meta(ge=0)]
Text = Annotated[str, Meta(min_length=1)]
# A string, or a list of strings, token ids or token-id lists. msgspec allows one array type per union, so the
# list's items are a union and `fastllm.server.requests` rejects lists that mix kinds.
PromptInput = Annotated[
    Text | Annotated[list[Text | TokenId | Annotated[list[TokenId], Meta(min_length=1)]], Meta(min_length=1)],
    _documented(one_of=[_TEXT, {"type": "array", "minItems": 1, "items": {"oneOf": [
        _TEXT, _TOKEN_ID, {"type": "array", "minItems": 1, "items": _TOKEN_ID}]}}]),
]
Stop = Annotated[
    Annotated[str, Meta(max_length=256)] | Annotated[list[Annotated[str, Meta(max_length=256)]], Meta(max_length=16)]
    | None,
    _documented(one_of=[_STOP, {"type": "array", "maxItems": 16, "items": _STOP}, {"type": "null"}]),
]
LogitBias = Annotated[
    dict[str, Annotated[float, Meta(ge=-100.0, le=100.0)]] | None,
    _documented(one_of=[{"type": "object", "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}},
                        {"type": "null"}]),
]


class TextPart(msgspec.Struct, kw_only=True):
    type: str
    text: str | None = None


class FunctionCall(msgspec.Struct, kw_only=True):
    name: str
    arguments: str  # a JSON object, as a string


class ToolCall(msgspec.Struct, kw_only=True):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(msgspec.Struct, kw_only=True):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant messages that called tools
    tool_call_id: str | None = None  # tool messages: the call they answer


FunctionName = Annotated[str, Meta(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")]


class FunctionDefinition(msgspec.Struct, kw_only=True):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None


class Tool(msgspec.Struct, kw_only=True):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(msgspec.Struct, kw_only=True):
    name: str


class NamedToolChoice(msgspec.Struct, kw_only=True):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(msgspec.Struct, kw_only=True):
    name: Annotated[str, Meta(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    # msgspec maps the JSON key "schema" to this field (a Struct attribute named `schema` would be fine too,
    # but reads like the class's own schema).
    json_schema: dict[str, Any] | None = msgspec.field(default=None, name="schema")
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(msgspec.Struct, kw_only=True):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """FastLLM's extension beside `response_format`, named as vLLM names it (`structured_outputs`, sent through
    the `openai` client's `extra_body`): exactly one of these."""

    json: Annotated[dict[str, Any] | None, Meta(description="A JSON schema the answer follows.")] = None
    regex: Annotated[str | None, Meta(description="A regular expression (Rust regex syntax) the whole answer "
                                                  "matches.")] = None
    grammar: Annotated[str | None, Meta(description="A Lark grammar in llguidance's dialect (`%json {...}` for "
                                                    "inline schemas), or a GBNF grammar, converted.")] = None
    choice: Annotated[Annotated[list[str], Meta(min_length=1)] | None,
                      Meta(description="The answer is exactly one of these strings.")] = None


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class _SamplingFields(msgspec.Struct, kw_only=True):
    model: str
    max_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: Annotated[float, Meta(gt=0.0, le=1.0), _documented(exclusive_minimum=0.0)] | None = None
    top_k: Annotated[int, Meta(ge=-1)] | None = None
    min_p: Probability | None = None
    n: PositiveInt = 1
    stop: Stop = None
    seed: int | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    # Logits are divided by it: below 0.01 they overflow float32 and sampling sees NaN probabilities.
    repetition_penalty: Annotated[float, Meta(ge=0.01, le=10.0)] | None = None
    logit_bias: LogitBias = None
    ignore_eos: bool = False
    # Extension: false opts this request out of speculative decoding where the model has it on.
    speculative: bool = True
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: Annotated[StructuredOutputs | None, Meta(description=(
        "FastLLM extension (vLLM's name): constrain the answer to exactly one of a JSON schema, a regular "
        "expression, a Lark/GBNF grammar or a choice of strings. Enforced token by token (llguidance)."))] = None


class ChatCompletionRequest(_SamplingFields, kw_only=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool = False
    top_logprobs: TopLogprobs | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    # vLLM's extension: extra variables for the model's chat template, e.g. {"enable_thinking": false} (Qwen3)
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(_SamplingFields, kw_only=True):
    prompt: PromptInput
    logprobs: TopLogprobs | None = None
    echo: bool = False
    suffix: str | None = None


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    model: str
    input: PromptInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: PositiveInt | None = None
    user: str | None = None


# ---- responses ------------------------------------------------------------------------------


class PromptTokensDetails(msgspec.Struct, kw_only=True):
    cached_tokens: int  # prompt tokens whose KV came from the prefix cache


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(msgspec.Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(msgspec.Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChatLogprobs(msgspec.Struct, kw_only=True):
    content: list[ChatTokenLogprob]


class AssistantMessage(msgspec.Struct, kw_only=True, omit_defaults=True):
    role: Literal["assistant"]  # no default, so that omit_defaults (for tool_calls) keeps it
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(msgspec.Struct, kw_only=True):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class ChatCompletion(msgspec.Struct, kw_only=True):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class FunctionCallDelta(msgspec.Struct, kw_only=True, omit_defaults=True):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(msgspec.Struct, kw_only=True, omit_defaults=True):
    index: int
    id: str | None = None
    type: str | None = None
    function: FunctionCallDelta


class ChatDelta(msgspec.Struct, kw_only=True, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(msgspec.Struct, kw_only=True):
    index: int
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(msgspec.Struct, kw_only=True):
    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(msgspec.Struct, kw_only=True):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(msgspec.Struct, kw_only=True):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class Completion(msgspec.Struct, kw_only=True):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class EmbeddingData(msgspec.Struct, kw_only=True):
    index: int
    embedding: list[float] | str
    object: str = "embedding"


class EmbeddingResponse(msgspec.Struct, kw_only=True):
    data: list[EmbeddingData]
    model: str
    usage: Usage
    object: str = "list"


class ModelCard(msgspec.Struct, kw_only=True):
    id: str
    created: int
    owned_by: str = "fastllm"
    object: str = "model"
    # FastLLM's own facts, beside OpenAI's fields: clients ignore what they do not know.
    task: str = ""
    provider: str = ""
    dtype: str = ""
    quantization: str = ""
    context_length: int = 0
    max_model_len: int = 0
    # Generation models: the running batch's KV cache (used now, budget; 0 = no limit) and the prefix cache.
    kv_cache_bytes: int = 0
    kv_budget_bytes: int = 0
    prefix_cache_bytes: int = 0
    prefix_cache_budget_bytes: int = 0


class ModelList(msgspec.Struct, kw_only=True):
    data: list[ModelCard]
    object: str = "list"


class ErrorBody(msgspec.Struct, kw_only=True):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(msgspec.Struct, kw_only=True):
    error: ErrorBody

