"""From a validated request body to what the engine runs: prompt ids, sampling and limits.

Everything here is a check a client can fail, so each raises a ``RequestError`` naming the field.
"""

from __future__ import annotations

from typing import Any

from fastllm.errors import ContextLengthError, InvalidRequestError, WrongModelTypeError
from fastllm.runtime.generation import GenerationRequest
from fastllm.runtime.models import ServedModel
from fastllm.runtime.sampling import SamplingParams
from fastllm.server.schemas import ChatCompletionRequest, ChatMessage, _SamplingFields

CHAT_ROLES = {"system", "user", "assistant", "developer"}
GREEDY_BELOW = 1e-5  # temperatures under this sample greedily


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """OpenAI messages → the plain dicts chat templates expect (text parts joined, developer = system)."""
    rendered = []
    for i, message in enumerate(messages):
        if message.role not in CHAT_ROLES:
            raise InvalidRequestError(
                f"messages[{i}].role {message.role!r} is not supported; use system, user or assistant",
                param=f"messages[{i}].role",
            )
        content = message.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise InvalidRequestError(
                        f"messages[{i}].content[{j}] has type {part.type!r}; only text parts are supported",
                        param=f"messages[{i}].content",
                    )
                texts.append(part.text)
            content = "".join(texts)
        role = "system" if message.role == "developer" else message.role
        rendered.append({"role": role, "content": content or ""})
    return rendered


def check_token_ids(model: ServedModel, ids: list[int], param: str) -> None:
    limit = model.tokenizer.vocab_size
    if any(i >= limit for i in ids):
        raise InvalidRequestError(f"{param} holds token ids outside the vocabulary (0..{limit - 1})", param=param)


def build(model: ServedModel, body: _SamplingFields, prompt_ids: list[int], *, max_n: int,
          logprobs: bool, top_logprobs: int, max_tokens: int | None) -> GenerationRequest:
    if body.n > max_n:
        raise InvalidRequestError(f"n is {body.n}; this server allows at most {max_n}", param="n")
    if not prompt_ids:
        raise InvalidRequestError("the prompt is empty", param="prompt")
    context = model.context_length
    room = context - len(prompt_ids)
    if room <= 0 or (max_tokens is not None and max_tokens > room):
        asked = max_tokens if max_tokens is not None else 1
        raise ContextLengthError(
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{len(prompt_ids) + asked} tokens ({len(prompt_ids)} in the prompt, {asked} for the completion). "
            "Please reduce the prompt or max_tokens.",
            param="max_tokens" if room > 0 else "messages",
        )
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    bias: dict[int, float] = {}
    for key, value in (body.logit_bias or {}).items():
        token = int(key) if key.isascii() and key.isdigit() and len(key) < 12 else -1  # not "²", "--1", 10**5000
        if not 0 <= token < model.tokenizer.vocab_size:
            raise InvalidRequestError(f"logit_bias key {key!r} is not a token id of this model",
                                      param="logit_bias")
        bias[token] = value
    temperature = 1.0 if body.temperature is None else body.temperature
    params = SamplingParams(
        # Dividing logits by a near-zero temperature overflows to inf (then NaN probabilities): treat it as
        # greedy, which is what it tends to, as vLLM does.
        temperature=0.0 if temperature < GREEDY_BELOW else temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=max(0, body.top_k or 0),
        min_p=body.min_p or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=body.repetition_penalty or 1.0,
        logit_bias=bias,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        # Any integer is a valid seed for clients; numpy's generators take only non-negative ones.
        seed=None if body.seed is None else body.seed % 2**64,
    )
    return GenerationRequest(prompt_ids=prompt_ids, params=params, max_tokens=max_tokens or room, stop=stop,
                             n=body.n, ignore_eos=body.ignore_eos)


def chat_request(model: ServedModel, body: ChatCompletionRequest, max_n: int) -> GenerationRequest:
    if model.chat_template is None:
        raise WrongModelTypeError(f"{model.id!r} has no chat template", param="model")
    prompt = model.chat_template.render(chat_messages(body.messages), add_generation_prompt=True)
    ids = model.tokenizer.encode(prompt, add_special_tokens=False)
    if body.top_logprobs and not body.logprobs:
        raise InvalidRequestError("top_logprobs requires logprobs to be true", param="top_logprobs")
    return build(model, body, ids, max_n=max_n, logprobs=body.logprobs, top_logprobs=body.top_logprobs or 0,
                 max_tokens=body.max_completion_tokens or body.max_tokens)


def token_lists(model: ServedModel, items: str | list[Any], param: str) -> list[list[int]]:
    """A string, strings, one token-id list or token-id lists → token-id lists (strings are encoded)."""
    if isinstance(items, str):
        items = [items]
    kinds = {type(item) for item in items}
    if len(kinds) > 1:
        raise InvalidRequestError(f"{param} mixes strings, token ids and token-id lists", param=param)
    if kinds == {int}:
        items = [items]
    lists = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            if not item:
                raise InvalidRequestError(f"{param}[{i}] is an empty string", param=param)
            lists.append(model.tokenizer.encode(item))
        else:
            check_token_ids(model, item, param)
            lists.append(list(item))
    return lists
