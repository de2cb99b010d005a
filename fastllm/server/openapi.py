"""What /docs/openapi.json promises for each endpoint: success bodies, streams and every error status.

Litestar documents a handler's success from its return annotation and adds a 400 in its own error
shape. Our handlers return pre-encoded bytes and every error in OpenAI's shape, so each route states
its responses here, and the generation routes add ``text/event-stream`` beside their JSON answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec
from litestar.openapi import ResponseSpec
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIResponse, OpenAPIType, Operation, Schema

from fastllm.server.schemas import ErrorResponse

_ERRORS = {
    400: "Invalid request: a parameter is missing, malformed or out of range (`param` names it)",
    401: "Missing or wrong API key (only when the server is started with API keys)",
    404: "No model with this id is served",
    408: "The request took longer than the server's request_timeout and was cancelled",
    413: "The body is larger than the server's max_body_bytes",
    415: "The body is declared as something other than JSON",
    429: "Too many requests are waiting; retry after the Retry-After header's seconds",
    500: "The model failed while serving this request",
    503: "The server is shutting down or not ready yet",
}

# Every status an endpoint that runs a model can answer with, besides 200.
MODEL_ERRORS = (400, 401, 404, 413, 415, 429, 500, 503)


def responses(success: Any, description: str, *errors: int) -> dict[int, ResponseSpec]:
    """A 200 carrying ``success`` and the listed error statuses, all in OpenAI's error shape."""
    specs = {200: ResponseSpec(success, description=description, generate_examples=False)}
    for status in sorted(errors):
        specs[status] = ResponseSpec(ErrorResponse, description=_ERRORS[status], generate_examples=False)
    return specs


def _inlined(struct: type) -> dict[str, Any]:
    """msgspec's JSON Schema of ``struct`` with each ``$ref`` replaced by its definition (none is recursive)."""
    root = msgspec.json.schema(struct)
    definitions = root.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(definitions[node["$ref"].rsplit("/", 1)[1]])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(value) for value in node]
        return node

    return resolve(root)


def _events(chunk: type) -> OpenAPIMediaType:
    """One Server-Sent Event: ``data`` holds a JSON ``chunk``, an error object, or the final ``[DONE]``."""
    payload = Schema(any_of=[_inlined(chunk), _inlined(ErrorResponse)])  # type: ignore[list-item]
    data = Schema(any_of=[
        Schema(const="[DONE]"),
        Schema(type=OpenAPIType.STRING, content_media_type="application/json", content_schema=payload),
    ])
    return OpenAPIMediaType(schema=Schema(
        type=OpenAPIType.OBJECT, required=["data"], properties={"data": data},
        description=f"Server-Sent Events when `stream` is true: one `{chunk.__name__}` per step (an `error` object "
                    "instead if the model fails mid-stream), then `[DONE]`.",
    ))


def streaming(chunk: type) -> type[Operation]:
    """An operation whose 200 is JSON, or Server-Sent Events of ``chunk`` when the request sets ``stream``."""
    events = _events(chunk)

    @dataclass
    class StreamingOperation(Operation):
        def __post_init__(self) -> None:
            ok = (self.responses or {}).get("200")
            if isinstance(ok, OpenAPIResponse) and ok.content is not None:
                ok.content["text/event-stream"] = events

    return StreamingOperation
