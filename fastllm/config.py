"""One configuration loader, one precedence: CLI flags > ``FASTLLM_*`` env > config file > defaults.

The file may be TOML (``config.toml``, the default) or JSON (the seed's ``config.json``). Every
section forbids unknown keys, so a typo in ``[server]`` is an error that names the key instead of a
setting that silently does nothing. The environment is read when ``load_settings`` is called, never
at import time.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from fastllm.errors import ConfigError

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_CONFIG_FILES = ("config.toml", "config.json")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=3000, ge=0, le=65535)
    # Bearer keys; empty means no authentication. Compared in constant time.
    api_keys: list[str] = Field(default_factory=list)
    # Origins allowed by CORS; empty disables CORS entirely (the safe default).
    cors_origins: list[str] = Field(default_factory=list)
    max_body_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    # Seconds a request may take end to end before it is cancelled.
    request_timeout: float = Field(default=600.0, gt=0)
    # Seconds in-flight requests get to finish on SIGTERM before they are cut.
    shutdown_timeout: float = Field(default=30.0, ge=0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"


class ModelConfig(_Section):
    # A folder under `models_dir`, a path, or a hub repo that already holds ONNX files.
    model_id: str = DEFAULT_MODEL
    revision: str | None = None
    # The id clients send as `model`; defaults to the name in the model's manifest.
    served_model_name: str | None = None


class RuntimeConfig(_Section):
    # "auto" = CUDA, then CoreML, then CPU; or an explicit ordered list of ONNX Runtime providers.
    providers: Literal["auto"] | list[str] = "auto"
    # Per-provider options, e.g. {"CUDAExecutionProvider" = {device_id = 0, gpu_mem_limit = 4e9}}.
    provider_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # Intra-op threads; 0 = physical cores.
    threads: int = Field(default=0, ge=0)
    # Sequences decoded together in one step (continuous batching).
    max_batch_size: int = Field(default=8, ge=1, le=256)
    # Prompt tokens prefilled between two decode steps, so new arrivals do not stall running streams.
    max_prefill_tokens: int = Field(default=2048, ge=16)
    # Requests waiting for a slot before new ones get 429.
    max_queue: int = Field(default=64, ge=0)
    # Largest `n` and `max_tokens` a request may ask for.
    max_n: int = Field(default=8, ge=1)
    # Embedding inputs batched into one run.
    embedding_batch_size: int = Field(default=32, ge=1)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="FASTLLM_", env_nested_delimiter="__", extra="forbid", case_sensitive=False
    )

    server: ServerConfig = Field(default_factory=ServerConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    # Further models served beside `model`, as [[models]] tables.
    models: list[ModelConfig] = Field(default_factory=list)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    models_dir: Path = Path("models")

    @field_validator("models", mode="before")
    @classmethod
    def _models_from_ids(cls, value: Any) -> Any:
        # `FASTLLM_MODELS='["a","b"]'` and `--model a --model b` give plain ids.
        if isinstance(value, list):
            return [{"model_id": item} if isinstance(item, str) else item for item in value]
        return value

    def all_models(self) -> list[ModelConfig]:
        return [self.model, *self.models]


class _FileSource(PydanticBaseSettingsSource):
    """The lowest-priority source: the sections read from the config file."""

    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self.data = data

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self.data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.data)


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    try:
        if path.suffix == ".json":
            data = json.loads(raw)
        else:
            data = tomllib.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid {path.suffix.lstrip('.') or 'TOML'}: {exc}") from None
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
            return (init_settings, env_settings, _FileSource(settings_cls, file_data))

    try:
        return _LoadedSettings(**_drop_none(overrides or {}))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        source = f" (file {path})" if path else ""
        raise ConfigError(f"invalid configuration{source}: {problems}") from None


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
