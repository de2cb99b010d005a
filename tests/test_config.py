"""Configuration: one precedence (CLI > FASTLLM_* env > file > defaults), loud errors, seed compatibility."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fastllm.config import ModelConfig, RuntimeConfig, ServerConfig, Settings, load_settings
from fastllm.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent

# The seed README's config.json, comments removed (JSON has none).
SEED_JSON = {
    "server": {"host": "127.0.0.1", "port": 3000},
    "model": {"model_id": "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "revision": "main"},
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No FASTLLM_* variable from the caller's shell, and no config.toml/json from the repo."""
    for name in list(os.environ):
        if name.upper().startswith("FASTLLM_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- precedence -------------------------------------------------------------------------------

def test_defaults_without_any_source() -> None:
    settings = load_settings()
    assert settings.server.port == 3000
    assert settings.server.host == "127.0.0.1"
    assert settings.model.model_id == "SmolLM2-135M-Instruct"
    assert settings.models == []
    assert settings.runtime.providers == "auto"


def test_file_then_env_then_cli_for_a_nested_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(tmp_path / "c.toml", '[server]\nport = 1111\nhost = "10.0.0.1"\n')
    assert load_settings(config).server.port == 1111

    monkeypatch.setenv("FASTLLM_SERVER__PORT", "2222")
    settings = load_settings(config)
    assert settings.server.port == 2222
    assert settings.server.host == "10.0.0.1"  # the env changes one key, the file keeps the rest

    settings = load_settings(config, {"server": {"port": 3333, "host": None}})
    assert settings.server.port == 3333
    assert settings.server.host == "10.0.0.1"  # None = flag not given


def test_default_config_file_is_picked_up_from_the_working_directory(tmp_path: Path) -> None:
    write(tmp_path / "config.json", json.dumps({"server": {"port": 4444}}))
    assert load_settings().server.port == 4444
    write(tmp_path / "config.toml", "[server]\nport = 5555\n")
    assert load_settings().server.port == 5555  # TOML wins when both exist


def test_seed_json_config_loads(tmp_path: Path) -> None:
    config = write(tmp_path / "custom-config.json", json.dumps(SEED_JSON, indent=4))
    settings = load_settings(config)
    assert settings.server.host == "127.0.0.1"
    assert settings.server.port == 3000
    assert settings.model.model_id == "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
    assert settings.model.revision == "main"


def test_toml_file_with_every_section(tmp_path: Path) -> None:
    config = write(tmp_path / "c.toml", """
models_dir = "/srv/models"
[server]
host = "0.0.0.0"
api_keys = ["k1"]
[model]
model_id = "chat"
served_model_name = "gpt-local"
[runtime]
providers = ["CPUExecutionProvider"]
threads = 2
[runtime.provider_options]
CPUExecutionProvider = { use_arena = "0" }
""")
    settings = load_settings(config)
    assert settings.models_dir == Path("/srv/models")
    assert settings.server.host == "0.0.0.0"
    assert settings.server.api_keys == ["k1"]
    assert settings.model.served_model_name == "gpt-local"
    assert settings.runtime.providers == ["CPUExecutionProvider"]
    assert settings.runtime.threads == 2
    assert settings.runtime.provider_options == {"CPUExecutionProvider": {"use_arena": "0"}}


def test_seed_env_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTLLM_SERVER__HOST", "0.0.0.0")
    monkeypatch.setenv("FASTLLM_SERVER__PORT", "8080")
    monkeypatch.setenv("FASTLLM_MODEL__MODEL_ID", "your-model-id")
    settings = load_settings()
    assert (settings.server.host, settings.server.port) == ("0.0.0.0", 8080)
    assert settings.model.model_id == "your-model-id"


def test_list_values_from_env_as_json_or_commas(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTLLM_SERVER__API_KEYS", '["a","b"]')
    assert load_settings().server.api_keys == ["a", "b"]
    monkeypatch.setenv("FASTLLM_SERVER__API_KEYS", "single-key")
    assert load_settings().server.api_keys == ["single-key"]
    monkeypatch.setenv("FASTLLM_SERVER__CORS_ORIGINS", "https://a.example, https://b.example")
    assert load_settings().server.cors_origins == ["https://a.example", "https://b.example"]


def test_providers_from_env_and_cli_strings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTLLM_RUNTIME__PROVIDERS", "CUDAExecutionProvider, CPUExecutionProvider")
    assert load_settings().runtime.providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setenv("FASTLLM_RUNTIME__PROVIDERS", '["CPUExecutionProvider"]')
    assert load_settings().runtime.providers == ["CPUExecutionProvider"]
    assert load_settings(overrides={"runtime": {"providers": "auto"}}).runtime.providers == "auto"


@pytest.mark.parametrize(("value", "expected"), [("auto", "auto"), ("true", True), ("false", False), ("0", False)])
def test_prefill_beside_is_auto_true_or_false(monkeypatch: pytest.MonkeyPatch, value: str, expected: object) -> None:
    assert load_settings().runtime.prefill_beside == "auto"
    monkeypatch.setenv("FASTLLM_RUNTIME__PREFILL_BESIDE", value)
    assert load_settings().runtime.prefill_beside == expected
    monkeypatch.setenv("FASTLLM_RUNTIME__PREFILL_BESIDE", "sometimes")
    with pytest.raises(ConfigError, match="FASTLLM_RUNTIME__PREFILL_BESIDE"):
        load_settings()


def test_unrelated_fastllm_env_variables_are_not_config(monkeypatch: pytest.MonkeyPatch) -> None:
    # tests/conftest.py reads FASTLLM_TEST_GPU; a top-level name that is no setting is left alone.
    monkeypatch.setenv("FASTLLM_TEST_GPU", "1")
    assert load_settings().server.port == 3000


# --- a different model starts a fresh [model] table ----------------------------------------------

def test_cli_model_does_not_inherit_the_files_revision_or_name(tmp_path: Path) -> None:
    config = write(tmp_path / "c.toml",
                   '[model]\nmodel_id = "org/a"\nrevision = "0123abc"\nserved_model_name = "a"\n')
    settings = load_settings(config, {"model": {"model_id": "org/b"}})
    assert settings.model == ModelConfig(model_id="org/b")
    # Naming the same model keeps the file's other keys; a flag without a model merges as usual.
    assert load_settings(config, {"model": {"model_id": "org/a"}}).model.revision == "0123abc"
    assert load_settings(config, {"model": {"served_model_name": "x"}}).model.revision == "0123abc"


def test_env_tuning_without_a_model_applies_to_the_cli_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTLLM_MODEL__SPECULATIVE", "ngram")
    settings = load_settings(None, {"model": {"model_id": "org/b"}})
    assert settings.model == ModelConfig(model_id="org/b", speculative="ngram")


def test_env_model_id_with_its_own_revision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(tmp_path / "config.json", json.dumps(SEED_JSON))
    monkeypatch.setenv("FASTLLM_MODEL__MODEL_ID", "org/other")
    monkeypatch.setenv("FASTLLM_MODEL__REVISION", "v2")
    assert load_settings(config).model == ModelConfig(model_id="org/other", revision="v2")


# --- several models ---------------------------------------------------------------------------

def test_models_tables_in_toml(tmp_path: Path) -> None:
    config = write(tmp_path / "c.toml", """
[model]
model_id = "chat"
[[models]]
model_id = "all-MiniLM-L6-v2"
[[models]]
model_id = "other"
served_model_name = "o"
""")
    settings = load_settings(config)
    assert [m.model_id for m in settings.all_models()] == ["chat", "all-MiniLM-L6-v2", "other"]
    assert settings.models[1].served_model_name == "o"


def test_models_from_cli_repeats_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # What `--model a --model b --model c` becomes in fastllm.cli._serve.
    settings = load_settings(overrides={"model": {"model_id": "a"}, "models": ["b", "c"]})
    assert [m.model_id for m in settings.all_models()] == ["a", "b", "c"]
    monkeypatch.setenv("FASTLLM_MODELS", '["x", {"model_id": "y", "served_model_name": "why"}]')
    settings = load_settings()
    assert [(m.model_id, m.served_model_name) for m in settings.models] == [("x", None), ("y", "why")]
    monkeypatch.setenv("FASTLLM_MODELS", "x,y")
    assert [m.model_id for m in load_settings().models] == ["x", "y"]


def test_unknown_key_in_models_table_names_it(tmp_path: Path) -> None:
    config = write(tmp_path / "c.toml", '[[models]]\nmodel_id = "a"\nrevison = "x"\n')
    with pytest.raises(ConfigError, match=r"models\.0\.revison"):
        load_settings(config)


# --- errors name the key and where it came from ------------------------------------------------

def test_unknown_server_key_is_an_error_naming_it(tmp_path: Path) -> None:
    config = write(tmp_path / "bad.toml", "[server]\nprot = 1\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    message = info.value.message
    assert "server.prot" in message
    assert "bad.toml" in message
    assert "port" in message.replace("server.prot", "")  # lists the keys that do exist
    assert "\n" not in message


@pytest.mark.parametrize("value", ['"abc"', "-1", "70000"])
def test_bad_port_value_names_server_port(tmp_path: Path, value: str) -> None:
    config = write(tmp_path / "bad.toml", f"[server]\nport = {value}\n")
    with pytest.raises(ConfigError, match=r"server\.port"):
        load_settings(config)


def test_unknown_top_level_section_is_an_error(tmp_path: Path) -> None:
    config = write(tmp_path / "bad.toml", "[sever]\nport = 1\n")
    with pytest.raises(ConfigError, match="sever"):
        load_settings(config)


def test_unknown_env_key_is_an_error_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTLLM_SERVER__BOGUS", "1")
    with pytest.raises(ConfigError, match=r"server\.bogus.*FASTLLM_SERVER__BOGUS"):
        load_settings()


def test_bad_env_value_names_the_variable_not_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(tmp_path / "c.toml", "[server]\nport = 1111\n")
    monkeypatch.setenv("FASTLLM_SERVER__PORT", "abc")
    with pytest.raises(ConfigError, match=r"server\.port = 'abc' \(in FASTLLM_SERVER__PORT\)") as info:
        load_settings(config)
    assert "c.toml" not in info.value.message


def test_bad_cli_value_says_it_came_from_the_flags() -> None:
    with pytest.raises(ConfigError, match=r"server\.port = 99999 \(in command-line flags\)"):
        load_settings(overrides={"server": {"port": 99999}})


def test_malformed_env_json_is_a_config_error_not_a_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTLLM_SERVER__API_KEYS", '["a"')
    with pytest.raises(ConfigError, match=r"server\.api_keys"):
        load_settings()
    monkeypatch.delenv("FASTLLM_SERVER__API_KEYS")
    monkeypatch.setenv("FASTLLM_SERVER", "{not json")
    with pytest.raises(ConfigError, match="server"):
        load_settings()


@pytest.mark.parametrize(("name", "text", "expected"), [
    ("bad.toml", "[server\n", "not valid TOML"),
    ("bad.json", '{"server": {"port": 1}, // comment\n}', "not valid JSON"),
    ("list.json", "[1, 2]", "table of sections"),
])
def test_unparsable_files(tmp_path: Path, name: str, text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_settings(write(tmp_path / name, text))


def test_missing_or_unreadable_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path)  # a directory


# --- the environment is read when loading, never at import ----------------------------------------

def test_environment_is_read_at_load_time_not_import_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTLLM_SERVER__PORT", "2345")
    assert load_settings().server.port == 2345
    monkeypatch.setenv("FASTLLM_SERVER__PORT", "3456")
    assert load_settings().server.port == 3456


def test_importing_does_not_read_the_environment(tmp_path: Path) -> None:
    # A broken variable must not break `import`; only load_settings() may complain about it.
    code = (
        "import fastllm.config, fastllm.cli\n"
        "from fastllm.errors import ConfigError\n"
        "try:\n    fastllm.config.load_settings()\nexcept ConfigError as e:\n    print('LOAD', e.message)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                            env=_child_env(FASTLLM_SERVER__PORT="abc", FASTLLM_SERVER__BOGUS="1"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("LOAD ")
    assert "server.port" in result.stdout and "server.bogus" in result.stdout


# --- config.example.toml never drifts from the code ------------------------------------------------

EXAMPLE = ROOT / "config.example.toml"


def test_example_config_equals_the_defaults() -> None:
    assert load_settings(EXAMPLE).model_dump() == Settings().model_dump() == load_settings().model_dump()


def test_example_config_documents_every_key() -> None:
    text = EXAMPLE.read_text()
    raw = [line.strip() for line in text.splitlines()]
    bare = [line.lstrip("#").strip() for line in raw]

    def documented(*forms: str) -> bool:
        # The key (set or commented out) appears, and the line above it is a comment explaining it.
        return any(line.startswith(forms) and index > 0 and raw[index - 1].startswith("#")
                   for index, line in enumerate(bare))

    sections = {"server": ServerConfig, "model": ModelConfig, "runtime": RuntimeConfig}
    for section, cls in sections.items():
        for key in cls.model_fields:
            assert documented(f"{key} =", f"[{section}.{key}]"), f"[{section}] {key} is not documented in the example"
    assert documented("models_dir =")
    for header in ("[server]", "[model]", "[runtime]", "[[models]]"):
        assert header in bare, f"{header} is missing from the example"
    assert set(Settings.model_fields) == {"models_dir", *sections, "models"}
    # The commented [[models]] example is itself valid configuration.
    block = text[text.index("# [[models]]"):].split("\n\n")[0]
    uncommented = "\n".join(line.lstrip("#").strip() for line in block.splitlines())
    models = tomllib.loads(uncommented)["models"]
    assert ModelConfig(**models[0]).model_id == "all-MiniLM-L6-v2"


def test_example_has_the_seed_keys() -> None:
    data = tomllib.loads(EXAMPLE.read_text())
    assert {"host", "port"} <= set(data["server"])
    assert "model_id" in data["model"]
    assert "revision =" in EXAMPLE.read_text()


# --- the command line ---------------------------------------------------------------------------

def _child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("FASTLLM_")}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), **extra)
    return env


def _fastllm(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fastllm", *args], capture_output=True, text=True, cwd=cwd,
                          env=_child_env(**env), timeout=120)


def test_cli_bad_config_fails_with_one_line_before_loading_models(tmp_path: Path) -> None:
    write(tmp_path / "bad.toml", "[server]\nprot = 1\n")
    result = _fastllm("serve", "--config", "bad.toml", "--model", "does-not-exist", cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "server.prot" in result.stderr
    assert "does-not-exist" not in result.stderr  # the model was never looked up
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_bad_env_fails_with_one_line(tmp_path: Path) -> None:
    result = _fastllm("--model", "does-not-exist", cwd=tmp_path, FASTLLM_SERVER__PORT="abc")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "FASTLLM_SERVER__PORT" in result.stderr


def test_cli_bad_flag_value_fails_before_loading(tmp_path: Path) -> None:
    result = _fastllm("serve", "--port", "70000", "--model", "does-not-exist", cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "server.port" in result.stderr


def test_seed_model_flag_without_subcommand_says_what_to_export(tmp_path: Path) -> None:
    result = _fastllm("--model", "does-not-exist", cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "fastllm export does-not-exist" in result.stderr


def test_seed_config_flag_without_subcommand_serves_from_that_file(tmp_path: Path) -> None:
    write(tmp_path / "custom-config.json", json.dumps(SEED_JSON))
    result = _fastllm("--config", "custom-config.json", cwd=tmp_path, HF_HOME=str(tmp_path / "hf"))
    assert result.returncode != 0  # nothing exported, hub offline
    assert "Traceback" not in result.stderr
    assert "fastllm export TinyLlama/TinyLlama-1.1B-Chat-v1.0" in result.stderr


@pytest.mark.parametrize("args", [["--help"], ["serve", "--help"], ["-h"]])
def test_help(tmp_path: Path, args: list[str]) -> None:
    result = _fastllm(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout
    assert "--config" in result.stdout and "--model" in result.stdout


# --- serve flags map onto settings (in process, server start replaced) ---------------------------------

@pytest.fixture
def captured_settings(monkeypatch: pytest.MonkeyPatch) -> list[Settings]:
    import fastllm.server.run

    seen: list[Settings] = []
    monkeypatch.setattr(fastllm.server.run, "run_server", seen.append)
    return seen


@pytest.mark.parametrize("subcommand", [["serve"], []])
def test_serve_flags_become_settings(captured_settings: list[Settings], subcommand: list[str]) -> None:
    from click.testing import CliRunner

    from fastllm.cli import main

    result = CliRunner().invoke(main, [
        *subcommand, "--model", "chat", "--model", "embed", "--served-model-name", "gpt", "--host", "0.0.0.0",
        "--port", "8080", "--models-dir", "/m", "--providers", "CUDAExecutionProvider, CPUExecutionProvider",
        "--threads", "2", "--max-batch-size", "4", "--api-key", "k1", "--api-key", "k2", "--log-level", "debug",
    ])
    assert result.exit_code == 0, result.output
    (settings,) = captured_settings
    assert [(m.model_id, m.served_model_name) for m in settings.all_models()] == [("chat", "gpt"), ("embed", None)]
    assert (settings.server.host, settings.server.port, settings.server.log_level) == ("0.0.0.0", 8080, "debug")
    assert settings.server.api_keys == ["k1", "k2"]
    assert settings.models_dir == Path("/m")
    assert settings.runtime.providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert (settings.runtime.threads, settings.runtime.max_batch_size) == (2, 4)


def test_serve_without_flags_keeps_file_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                captured_settings: list[Settings]) -> None:
    from click.testing import CliRunner

    from fastllm.cli import main

    write(tmp_path / "config.toml", '[server]\nport = 1111\napi_keys = ["file-key"]\n[[models]]\nmodel_id = "e"\n')
    monkeypatch.setenv("FASTLLM_SERVER__HOST", "0.0.0.0")
    result = CliRunner().invoke(main, ["serve", "--model", "chat"])
    assert result.exit_code == 0, result.output
    (settings,) = captured_settings
    assert (settings.server.host, settings.server.port) == ("0.0.0.0", 1111)
    assert settings.server.api_keys == ["file-key"]  # no --api-key flag: the file's keys stay
    assert [m.model_id for m in settings.all_models()] == ["chat", "e"]  # one --model keeps [[models]]
