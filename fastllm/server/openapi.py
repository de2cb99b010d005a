"""What /docs/openapi.json promises for each endpoint: success bodies, streams and every error status.

Litestar documents a handler's success from its return annotation and adds a 400 in its own error
shape. Our handlers return pre-encoded bytes and every error in OpenAI's shape, so each route states
its responses here, and the generation routes add ``text/event-stream`` beside their JSON answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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


_SSE = OpenAPIMediaType(schema=Schema(
    type=OpenAPIType.STRING,
    description="Server-Sent Events when `stream` is true: `data: {chunk}` per step (an `error` object if the "
                "model fails mid-stream), then `data: [DONE]`.",
))


@dataclass
class StreamingOperation(Operation):
    """An operation whose 200 is JSON, or Server-Sent Events when the request sets ``stream``."""

    def __post_init__(self) -> None:
        ok = (self.responses or {}).get("200")
        if isinstance(ok, OpenAPIResponse) and ok.content is not None:
            ok.content["text/event-stream"] = _SSE
