"""Every error FastLLM raises on purpose, in one hierarchy.

The server maps these to HTTP in exactly one place (``fastllm.server.errors``) and the CLI prints
them without a traceback, so code anywhere can raise the precise type and stay ignorant of both::

    FastLLMError                      base: message + machine-readable code
    ├── ConfigError                   bad config key or value (exit before loading anything)
    ├── MissingExtraError             an optional dependency group is not installed
    ├── ExportError                   `fastllm export` cannot proceed
    │   ├── SourceNotFoundError       unknown hub id, missing path, gated repo without token
    │   ├── UnsupportedModelError     architecture we cannot export (lists the supported ones)
    │   ├── OutputExistsError         output folder exists and --force was not given
    │   └── CorruptModelError         unreadable GGUF / ONNX / manifest
    ├── ModelLoadError                a model folder cannot be served
    ├── BenchError                    `fastllm bench` cannot reach its target or read a report
    └── RequestError                  a client request cannot be served (4xx)
        ├── InvalidRequestError       400, names the offending parameter
        ├── ContextLengthError        400, prompt + max_tokens exceed the context window
        ├── ModelNotFoundError        404 model_not_found
        ├── WrongModelTypeError       400, chat sent to an embedding model or the reverse
        ├── OverloadedError           429/503 with Retry-After
        └── EngineError               500, a generation failed inside the engine
"""

from __future__ import annotations


class FastLLMError(Exception):
    """Base class: ``code`` is stable for machines, the message is written for people."""

    code: str = "fastllm_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class ConfigError(FastLLMError):
    code = "config_error"


class MissingExtraError(FastLLMError):
    """Raised where a lazy import of an optional group fails; says the exact pip command."""

    code = "missing_extra"

    def __init__(self, extra: str, module: str) -> None:
        super().__init__(
            f"'{module}' is not installed; it belongs to the '{extra}' extra. "
            f'Install it with: pip install "fastllm[{extra}]"'
        )
        self.extra = extra


class ExportError(FastLLMError):
    code = "export_error"


class SourceNotFoundError(ExportError):
    code = "source_not_found"


class UnsupportedModelError(ExportError):
    code = "unsupported_model"


class OutputExistsError(ExportError):
    code = "output_exists"


class CorruptModelError(ExportError):
    code = "corrupt_model"


class ModelLoadError(FastLLMError):
    code = "model_load_error"


class BenchError(FastLLMError):
    code = "bench_error"


class RequestError(FastLLMError):
    """A request the server refuses; ``status`` and ``param`` go straight into the response."""

    status: int = 400
    error_type: str = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.param = param


class InvalidRequestError(RequestError):
    code = "invalid_request"


class ContextLengthError(RequestError):
    code = "context_length_exceeded"


class ModelNotFoundError(RequestError):
    status = 404
    code = "model_not_found"


class WrongModelTypeError(RequestError):
    code = "wrong_model_type"


class OverloadedError(RequestError):
    """Too many requests queued: 429 while we are up, 503 while draining for shutdown."""

    status = 429
    error_type = "rate_limit_error"
    code = "overloaded"

    def __init__(self, message: str, *, status: int = 429, retry_after: int = 1) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        if status == 503:
            self.error_type = "server_error"
            self.code = "shutting_down"


class EngineError(RequestError):
    status = 500
    error_type = "server_error"
    code = "engine_error"
