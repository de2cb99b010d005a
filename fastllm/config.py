"""One configuration loader, one precedence: CLI flags > ``FASTLLM_*`` env > config file > defaults.

The file may be TOML (``config.toml``, the default) or JSON (the seed's ``config.json``). Every
section forbids unknown keys, so a typo in ``[server]`` is an error that names the key instead of a
setting that silently does nothing. The environment is read when ``load_settings`` is called, never
at import time.

Sections merge key by key (``FASTLLM_SERVER__PORT`` changes the port and keeps the file's host),
with one exception: a higher source that names a *different* ``model.model_id`` starts a fresh
``[model]`` table, so ``--model B`` never inherits the ``revision`` or ``served_model_name`` that
the file wrote for model A.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from fastllm.errors import ConfigError

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_CONFIG_FILES = ("config.toml", "config.json")
ENV_PREFIX = "FASTLLM_"


def _split_list(value: Any) -> Any:
    """Lists may come from the environment as JSON (``'["a","b"]'``) or comma-separated (``a,b``)."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a valid JSON list ({exc.msg})") from None
    return [item.strip() for item in text.split(",") if item.strip()]


StrList = Annotated[list[str], NoDecode]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=3000, ge=0, le=65535)
    # Bearer keys; empty means no authentication. Compared in constant time.
    api_keys: StrList = Field(default_factory=list)
    # Origins allowed by CORS; empty disables CORS entirely (the safe default).
    cors_origins: StrList = Field(default_factory=list)
    max_body_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    # Seconds a request may take end to end before it is cancelled.
    request_timeout: float = Field(default=600.0, gt=0)
    # Seconds in-flight requests get to finish on SIGTERM before they are cut.
    shutdown_timeout: float = Field(default=30.0, ge=0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    _lists = field_validator("api_keys", "cors_origins", mode="before")(_split_list)


class ModelConfig(_Section):
    # A folder under `models_dir`, a path, or a hub repo that already holds ONNX files.
    model_id: str = DEFAULT_MODEL
    revision: str | None = None
    # The id clients send as `model`; defaults to the name in the model's manifest.
    served_model_name: str | None = None
    # How the model writes tool calls: "auto" reads it from the chat template; or "hermes" (<tool_call>),
    # "mistral" ([TOOL_CALLS]), "llama3_json", "fallback" (tools described in the system prompt by FastLLM).
    tool_call_format: Literal["auto", "hermes", "mistral", "llama3_json", "fallback"] = "auto"
    # Speculative decoding: "ngram" drafts the next tokens from the sequence's own earlier text (prompt lookup)
    # and verifies them in one step, which pays off where answers repeat their input (code edits, RAG, tool
    # loops); outputs keep their distribution. Needs a fused graph. Requests opt out with "speculative": false.
    # "draft": a small model that shares this one's tokenizer drafts (`draft_model`), e.g. Qwen2.5-Coder-0.5B for
    # the 1.5B; it guesses everywhere, at the cost of its own decode steps.
    speculative: Literal["off", "ngram", "draft"] = "off"
    # The most tokens drafted for one step (each sequence starts at 4; prompt lookup doubles while all are
    # accepted, a draft model adds one, since each of its tokens costs a step).
    speculative_tokens: int = Field(default=32, ge=1, le=64)
    # speculative = "draft": the draft model, named as model_id is (an export of the fused graph).
    draft_model: str | None = None


class RuntimeConfig(_Section):
    # "auto" = CUDA, then ROCm, CoreML, DirectML, then CPU; or an explicit ordered list of providers.
    providers: Literal["auto"] | list[str] = "auto"
    # Per-provider options, e.g. {"CUDAExecutionProvider" = {device_id = 0, gpu_mem_limit = 4_000_000_000}}.
    provider_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # Intra-op threads; 0 = physical cores.
    threads: int = Field(default=0, ge=0)
    # Sequences decoded together in one step (continuous batching).
    max_batch_size: int = Field(default=8, ge=1, le=256)
    # Prompt tokens prefilled between two decode steps, so new arrivals do not stall running streams.
    max_prefill_tokens: int = Field(default=2048, ge=16)
    # A prompt longer than this that arrives while others are decoding is prefilled in chunks of this many
    # tokens, one chunk between two decode steps (chunked prefill); alone, a prompt is prefilled whole.
    prefill_chunk_tokens: int = Field(default=256, ge=16)
    # While a long prompt is read in chunks, the streams already running wait at most about this many times
    # their usual gap between tokens: each chunk is sized to fit (at least 8 tokens, at most
    # prefill_chunk_tokens), so the prompt takes longer to its first token. 0: chunks of prefill_chunk_tokens.
    prefill_stall_ratio: float = Field(default=3.0, ge=0.0)
    # On the CPU, read such a prompt instead in a thread of its own, beside the decode steps, each on half the cores:
    # the running streams' gaps between tokens stay about twice their usual, where chunks make them three to four
    # times; it loads the model's graphs a second time (SmolLM2 int4: 696 instead of 407 MiB). "auto": where the
    # graphs' files take at most an eighth of the memory (the machine's, or the container's limit).
    prefill_beside: bool | Literal["auto"] = "auto"
    # Read prompts through the export's int8 prompt graph where it has one (CPU; about twice as fast a prefill as
    # the int4 graph, which still decodes); false leaves its memory free (as much again as the int4 weights).
    prefill_graph: bool = True
    # Decode steps of at least this many rows also run through that prompt graph: its integer GEMM outruns the int4
    # kernel once a step multiplies several rows (2-core Xeon: +7% at 4 rows, +14% / +34% at 8 for SmolLM2 /
    # Qwen2.5-Coder-0.5B; slower at 1-2). A request's greedy answer then depends on how many others decode beside
    # it, as each graph rounds its own way. 1: every step through the int8 graph, whose rows compute alike alone and
    # batched on any CPU (batch-invariant greedy but while a prompt is read beside the steps). 0: every step through
    # the int4 graph, batch-invariant only where the CPU's one-row int4 kernel sums as the batched one does
    # (AVX-512, not AVX2-only CPUs: see runtime.models._check_batch_invariance).
    int8_decode_rows: int = Field(default=4, ge=0)
    # Requests waiting for a slot before new ones get 429.
    max_queue: int = Field(default=64, ge=0)
    # Largest `n` (choices per request) a request may ask for.
    max_n: int = Field(default=8, ge=1)
    # Embedding inputs batched into one run.
    embedding_batch_size: int = Field(default=32, ge=1)
    # Keep the KV cache on the device between decode steps (ONNX Runtime IOBinding): "auto" = on GPUs.
    io_binding: Literal["auto", "on", "off"] = "auto"
    # Host memory for the prefix cache, per model: the KV of recent prompts, reused by prompts that start
    # the same way (system prompts, tools, chat histories). 0 turns it off.
    prefix_cache_mb: int = Field(default=1024, ge=0)
    # Memory for the running batch's KV cache, per model: a request waits while admitting it would take the
    # batch past this (rows share one padded width: rows x longest row); one that alone would is refused.
    # 0 = no limit.
    kv_budget_mb: int = Field(default=4096, ge=0)

    @field_validator("providers", mode="before")
    @classmethod
    def _providers(cls, value: Any) -> Any:
        # "auto", a list, or the CLI/env spelling "CUDAExecutionProvider,CPUExecutionProvider".
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        value = _split_list(value)
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise ValueError('must be "auto" or a list of ONNX Runtime provider names')
        return [item.strip() for item in value]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", case_sensitive=False
    )

    server: ServerConfig = Field(default_factory=ServerConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    # Further models served beside `model`, as [[models]] tables.
    models: Annotated[list[ModelConfig], NoDecode] = Field(default_factory=list)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    models_dir: Path = Path("models")

    @field_validator("models", mode="before")
    @classmethod
    def _models_from_ids(cls, value: Any) -> Any:
        # `FASTLLM_MODELS='["a","b"]'`, `FASTLLM_MODELS=a,b` and `--model a --model b` give plain ids.
        value = _split_list(value)
        if isinstance(value, list):
            return [{"model_id": item} if isinstance(item, str) else item for item in value]
        return value

    def all_models(self) -> list[ModelConfig]:
        return [self.model, *self.models]


_SECTIONS: dict[str, type[BaseModel]] = {
    "server": ServerConfig, "model": ModelConfig, "models": ModelConfig, "runtime": RuntimeConfig,
}


class _LayeredSource(PydanticBaseSettingsSource):
    """File, then environment, then CLI, merged by us so that errors can say where a value came from."""

    def __init__(self, settings_cls: type[BaseSettings], env: PydanticBaseSettingsSource,
                 file_data: dict[str, Any], cli_data: dict[str, Any], layers: dict[str, dict[str, Any]]) -> None:
        super().__init__(settings_cls)
        self.env = env
        self.file_data = file_data
        self.cli_data = cli_data
        self.layers = layers

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ builds the whole dict

    def __call__(self) -> dict[str, Any]:
        self.layers.update(file=self.file_data, env=self.env(), cli=self.cli_data)
        merged: dict[str, Any] = {}
        for name in ("file", "env", "cli"):
            merged = _merge(merged, self.layers[name], top_level=True)
        return merged


def _merge(base: dict[str, Any], top: dict[str, Any], *, top_level: bool = False) -> dict[str, Any]:
    result = dict(base)
    for key, value in top.items():
        below = result.get(key)
        if isinstance(value, dict) and isinstance(below, dict):
            # A [model] table that names another model than the one below it describes that model: the keys
            # below (another model's) are dropped. One below that names no model (FASTLLM_MODEL__SPECULATIVE
            # alone) tunes whichever model is served, and stays.
            starts_fresh = (top_level and key == "model" and "model_id" in value
                            and below.get("model_id", value["model_id"]) != value["model_id"])
            result[key] = dict(value) if starts_fresh else _merge(below, value)
        else:
            result[key] = value
    return result


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    is_json = path.suffix.lower() == ".json"
    try:
        data = json.loads(raw) if is_json else tomllib.loads(raw.decode("utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path} is not valid JSON: {exc} (JSON cannot hold comments; use a .toml file for those)"
        ) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a table of sections")
    return data


def _default_config_file() -> Path | None:
    for name in DEFAULT_CONFIG_FILES:
        if Path(name).is_file():
            return Path(name)
    return None


def load_settings(config_file: Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Build settings from all sources; ``overrides`` are the CLI flags (nested dicts, None = unset)."""
    path = config_file or _default_config_file()
    file_data = read_config_file(path) if path else {}
    cli_data = _drop_none(overrides or {})
    layers: dict[str, dict[str, Any]] = {}

    class _LoadedSettings(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (_LayeredSource(settings_cls, env_settings, file_data, cli_data, layers),)

    try:
        return _LoadedSettings()
    except SettingsError as exc:
        raise ConfigError(
            f"invalid configuration: {exc}; {ENV_PREFIX}* values for tables and lists must be JSON"
        ) from None
    except ValidationError as exc:
        problems = "; ".join(_describe(err, layers, path) for err in exc.errors())
        raise ConfigError(f"invalid configuration: {problems}") from None


def _describe(err: Any, layers: dict[str, dict[str, Any]], path: Path | None) -> str:
    """One problem as `server.port = 'abc' (from FASTLLM_SERVER__PORT): Input should be ...`."""
    loc = tuple(err["loc"])
    key = ".".join(str(part) for part in loc) or "(top level)"
    origin = _origin(loc, layers, path)
    where = f" (in {origin})" if origin else ""
    if err["type"] == "extra_forbidden":
        section = _SECTIONS.get(str(loc[0])) if len(loc) > 1 else Settings
        known = ", ".join(section.model_fields) if section else ""
        hint = f"; the known keys here are {known}" if known else ""
        return f"{key}{where}: unknown key{hint}"
    shown = "" if err["type"] == "missing" else f" = {err['input']!r}"
    message = str(err["ctx"]["error"]) if err["type"] == "value_error" else err["msg"]
    return f"{key}{shown}{where}: {message}"


def _origin(loc: tuple[Any, ...], layers: dict[str, dict[str, Any]], path: Path | None) -> str:
    """The highest source that holds the value at ``loc`` (or its nearest parent)."""
    for name in ("cli", "env", "file"):
        depth = _depth_found(layers.get(name, {}), loc)
        if depth == 0:
            continue
        if name == "cli":
            return "command-line flags"
        if name == "file":
            return str(path)
        present = {key.upper() for key in os.environ}
        for size in range(depth, 0, -1):
            var = ENV_PREFIX + "__".join(str(part) for part in loc[:size]).upper()
            if var in present:
                return var
        return f"{ENV_PREFIX}* environment"
    return ""


def _depth_found(data: Any, loc: tuple[Any, ...]) -> int:
    depth = 0
    for part in loc:
        in_dict = isinstance(data, dict) and part in data
        in_list = isinstance(data, list) and isinstance(part, int) and part < len(data)
        if not (in_dict or in_list):
            break
        data = data[part]
        depth += 1
    return depth


def _drop_none(values: dict[str, Any]) -> dict[str, Any]:
    cleaned: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            value = _drop_none(value)
            if value:
                cleaned[key] = value
        elif value is not None and value != ():
            cleaned[key] = value
    return cleaned
