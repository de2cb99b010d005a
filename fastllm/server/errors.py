"""The one place where exceptions become HTTP responses, all in OpenAI's error shape.

``{"error": {"message", "type", "param", "code"}}`` with the right status; never a traceback. Our
own ``RequestError``s carry their status; Litestar's ``HTTPException``s (validation, malformed
JSON, 404 route, 405, 413) keep theirs; anything else is a logged 500 with a generic message.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException

from fastllm.errors import OverloadedError, RequestError
from fastllm.server.schemas import ErrorBody, ErrorResponse

log = logging.getLogger(__name__)

_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
          408: "timeout_error", 413: "invalid_request_error", 429: "rate_limit_error"}


def error_response(status: int, message: str, *, error_type: str | None = None, param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> Response[bytes]:
    body = ErrorResponse(error=ErrorBody(
        message=message,
        type=error_type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
        param=param, code=code,
    ))
    return Response(msgspec.json.encode(body), status_code=status, media_type="application/json",
                    headers=headers)


def error_payload(exc: BaseException) -> bytes:
    """The JSON body for an error that happens after a stream has started (sent as an SSE event)."""
    _, body, _ = _describe(exc)
    return msgspec.json.encode(ErrorResponse(error=body))


def _describe(exc: BaseException) -> tuple[int, ErrorBody, dict[str, str] | None]:
    if isinstance(exc, RequestError):
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, OverloadedError) else None
        return exc.status, ErrorBody(message=exc.message, type=exc.error_type, param=exc.param,
                                     code=exc.code), headers
    if isinstance(exc, UnicodeDecodeError | msgspec.DecodeError | RecursionError):
        return 400, ErrorBody(message=f"malformed JSON body: {exc}", type="invalid_request_error",
                              code="invalid_json"), None
    if isinstance(exc, ValidationException):
        param, message = _validation_detail(exc)
        return 400, ErrorBody(message=message, type="invalid_request_error", param=param,
                              code="invalid_value"), None
    if isinstance(exc, HTTPException):
        status = exc.status_code
        return status, ErrorBody(
            message=str(exc.detail),
            type=_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
            code=None,
        ), dict(exc.headers or {}) or None
    return 500, ErrorBody(message="internal server error", type="server_error", code="internal_error"), None


def _validation_detail(exc: ValidationException) -> tuple[str | None, str]:
    extra: Any = exc.extra
    if isinstance(extra, list) and extra and isinstance(extra[0], dict):
        first = extra[0]
        key = first.get("key")
        message = str(first.get("message") or exc.detail)
        if key == "data":  # Litestar's name for the whole body, not a parameter a client knows
            return None, f"invalid request body: {message}"
        param = key if isinstance(key, str) and key else None
        # msgspec reports the path as `$.field[0]`; OpenAI names the parameter plainly.
        if "$." in message:
            param = param or message.split("$.", 1)[1].split("`", 1)[0].strip()
        return param, f"invalid request: {message}" if param is None else f"invalid value for {param}: {message}"
    detail = str(exc.detail)
    if "json" in detail.lower() or "decode" in detail.lower():
        return None, f"malformed JSON body: {detail}"
    return None, f"invalid request: {detail}"


def handle_exception(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    status, body, headers = _describe(exc)
    if status >= 500:
        if isinstance(exc, RequestError):
            log.error("request %s %s failed: %s", request.method, request.url.path, exc.message)
        else:
            log.exception("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    response = error_response(status, body.message, error_type=body.type, param=body.param, code=body.code,
                              headers=headers)
    return response
