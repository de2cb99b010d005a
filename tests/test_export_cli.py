"""`fastllm export` and `fastllm models` through the real CLI in a subprocess, and what an export
that fails half way leaves behind (nothing servable)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import tiny_models
from conftest import tiny_export
from fakehub import assert_clean_failure, hub_env, run_fastllm

from fastllm.errors import ExportError
from fastllm.export.pipeline import ExportOptions, export
from fastllm.manifest import MANIFEST_NAME, read_manifest


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    # No hub: every source in these tests is local, and a stray hub call must fail, not hang.
    return hub_env(tmp_path, HF_HUB_OFFLINE="1")


# --- errors --------------------------------------------------------------------------------------


def test_unsupported_architecture_lists_supported_ones(tmp_path: Path, env: dict[str, str]) -> None:
    result = run_fastllm("export", tiny_models.build("gpt2"), "--output", tmp_path / "out", env=env)
    line = assert_clean_failure(result, "'gpt2' is not supported", "Supported:")
    for model_type in ("llama", "mistral", "qwen2", "phi3", "gemma", "bert"):
        assert model_type in line
    assert not (tmp_path / "out").exists()


def test_embedding_architecture_as_text_generation_is_refused(tmp_path: Path, env: dict[str, str]) -> None:
    result = run_fastllm("export", tiny_models.build("bert-mean"), "--task", "text-generation", "--output",
                         tmp_path / "out", env=env)
    assert_clean_failure(result, "'bert' is not supported for text-generation")


def test_existing_output_needs_force(tmp_path: Path, env: dict[str, str]) -> None:
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    result = run_fastllm("export", tiny_models.build("llama"), "--output", output, env=env)
    assert_clean_failure(result, "already exists", "--force")
    assert [p.name for p in output.iterdir()] == ["keep.txt"]


def test_corrupt_gguf(tmp_path: Path, env: dict[str, str]) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(os.urandom(4096))
    result = run_fastllm("export", path, "--output", tmp_path / "out", env=env)
    assert_clean_failure(result, "x.gguf", "not a readable GGUF file")


def test_truncated_gguf(tmp_path: Path, env: dict[str, str], smollm2_gguf: Path) -> None:
    """A real GGUF header cut short (an interrupted download)."""
    path = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with smollm2_gguf.open("rb") as handle:
        path.write_bytes(handle.read(1 << 16))
    result = run_fastllm("export", path, "--output", tmp_path / "out", env=env)
    assert_clean_failure(result, "not a readable GGUF file")


def test_missing_source(tmp_path: Path, env: dict[str, str]) -> None:
    result = run_fastllm("export", tmp_path / "nope.gguf", env=env, cwd=tmp_path)
    assert_clean_failure(result, "GGUF file not found")
    result = run_fastllm("export", "not a path or id", env=env, cwd=tmp_path)
    assert_clean_failure(result, "neither a local folder")
    folder = tmp_path / "empty"
    folder.mkdir()
    result = run_fastllm("export", folder, env=env, cwd=tmp_path)
    assert_clean_failure(result, "no config.json")


def test_bf16_is_refused(tmp_path: Path, env: dict[str, str]) -> None:
    result = run_fastllm("export", tiny_models.build("llama"), "--dtype", "bf16", "--output", tmp_path / "o", env=env)
    assert_clean_failure(result, "bf16", "--dtype fp16", "--quantize int4")


def test_fp16_with_quantize_is_refused_on_optimums_graph(tmp_path: Path, env: dict[str, str]) -> None:
    result = run_fastllm("export", tiny_models.build("llama"), "--graph", "optimum", "--dtype", "fp16", "--quantize",
                         "int4", env=env, cwd=tmp_path)
    assert_clean_failure(result, "cannot be combined")
    # --graph auto takes the fused graph, whose fp16 int4 is the GPUs' int4; where there is none, it says so.
    result = run_fastllm("export", tiny_models.build("bert-mean"), "--task", "embedding", "--dtype", "fp16",
                         "--quantize", "int4", env=env, cwd=tmp_path)
    assert_clean_failure(result, "needs the fused graph")


def test_an_export_too_large_for_the_memory_fails_before_loading(tmp_path: Path, env: dict[str, str],
                                                                 smollm2_gguf: Path) -> None:
    """The estimate comes from the file's tensor headers (SmolLM2: 0.13B weights), before any weight loads."""
    result = run_fastllm("export", smollm2_gguf, "--quantize", "int4", "--max-memory", "0.5", "--output",
                         tmp_path / "o", env=env)
    line = assert_clean_failure(result, "needs about", "0.13B weights held at fp16", "0.5 GB is --max-memory")
    assert "[2/5] loading" not in result.stderr, line
    result = run_fastllm("export", smollm2_gguf, "--graph", "optimum", "--max-memory", "1", "--output",
                         tmp_path / "o", env=env)
    assert_clean_failure(result, "held at fp32", "1.0 GB is --max-memory")
    assert not (tmp_path / "o").exists()


def test_missing_export_extra_names_the_install_command(tmp_path: Path, env: dict[str, str]) -> None:
    result = run_fastllm("export", tiny_models.build("llama"), "--output", tmp_path / "o", env=env,
                         prelude="sys.modules['optimum'] = None")
    assert_clean_failure(result, "'optimum' is not installed", 'pip install "fastllm[export]"')


# --- success through the CLI ------------------------------------------------------------------------


def test_cli_export_is_quiet_and_shows_progress(tmp_path: Path, env: dict[str, str]) -> None:
    """One quantized export through the CLI: progress lines, the quality figures, and no noise."""
    result = run_fastllm("export", tiny_models.build("qwen2"), "--quantize", "int4", "--models-dir",
                         tmp_path / "models", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    output = tmp_path / "models" / "qwen2-int4"
    assert result.stdout.strip() == str(output)
    manifest = read_manifest(output)
    assert (manifest.model_type, manifest.quantization) == ("qwen2", "int4")
    for step in range(1, 6):
        assert f"[{step}/5]" in result.stderr
    assert "quality vs PyTorch fp16" in result.stderr  # the fused int4 export holds the model at fp16
    assert "peak memory" in result.stderr.splitlines()[-1]
    for noise in ("TracerWarning", "Traceback", "Found different candidate", "skip to quantize",
                  "start to quantize", "attention mask is not set", "Batches:"):
        assert noise not in result.stderr, noise
    assert len(result.stderr.splitlines()) < 30, result.stderr
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["qwen2-int4"]  # no staging left


# --- fastllm models ---------------------------------------------------------------------------------


def test_models_lists_exports(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    shutil.copytree(tiny_export("llama"), models / "llama")
    shutil.copytree(tiny_export("llama", quantize="int4"), models / "llama-int4")
    shutil.copytree(tiny_export("bert-mean"), models / "embedder")
    shutil.copytree(tiny_export("llama"), models / ".llama.partial-1234")  # a killed export
    (models / "notes").mkdir()
    (models / "broken").mkdir()
    (models / "broken" / MANIFEST_NAME).write_text("{not json")
    result = run_fastllm("models", "--models-dir", models)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["FOLDER", "MODEL", "ID", "TASK", "GRAPH", "DTYPE", "QUANT", "SIZE"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {"llama", "llama-int4", "embedder"}
    assert rows["llama"][1:6] == ["llama", "text-generation", "optimum", "fp32", "none"]
    assert rows["llama-int4"][1:6] == ["llama-int4", "text-generation", "optimum", "fp32", "int4"]
    assert rows["embedder"][1:6] == ["bert-mean", "embedding", "-", "fp32", "none"]
    for row in rows.values():
        assert row[-1] == "MB" and float(row[-2]) > 0
    assert float(rows["llama-int4"][-2]) < float(rows["llama"][-2])
    assert "broken" in result.stderr and "Traceback" not in result.stderr


def test_models_on_empty_folder(tmp_path: Path) -> None:
    result = run_fastllm("models", "--models-dir", tmp_path / "none")
    assert result.returncode == 0
    assert "no exported models" in result.stdout


# --- an export that fails half way leaves nothing servable --------------------------------------------


def _staging_seen(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> list[Path]:
    """Make validation raise ``error``, recording the folder it was asked to validate."""
    from fastllm.export import validate

    seen: list[Path] = []

    def fail(folder: Path, *args: object, **kwargs: object) -> None:
        seen.append(folder)
        assert (folder / "model.onnx").is_file() and not (folder / MANIFEST_NAME).exists()
        raise error

    monkeypatch.setattr(validate, "check_greedy", fail)
    return seen


@pytest.mark.parametrize("error", [ExportError("validation failed: simulated"), KeyboardInterrupt()],
                         ids=["validation-fails", "interrupted"])
def test_failed_export_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      error: BaseException) -> None:
    seen = _staging_seen(monkeypatch, error)
    models = tmp_path / "models"
    output = models / "llama"
    with pytest.raises(type(error)):
        export(ExportOptions(source=str(tiny_models.build("llama")), output=output))
    assert len(seen) == 1 and seen[0].parent == models and seen[0].name.startswith(".llama.partial-")
    assert not output.exists()
    assert list(models.iterdir()) == []  # the hidden staging folder is gone too
    assert not list(tmp_path.rglob(MANIFEST_NAME))


def test_failed_forced_export_keeps_the_previous_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    output = tmp_path / "llama"
    shutil.copytree(tiny_export("llama"), output)
    before = {p.name: p.read_bytes() for p in output.iterdir()}
    _staging_seen(monkeypatch, ExportError("validation failed: simulated"))
    with pytest.raises(ExportError):
        export(ExportOptions(source=str(tiny_models.build("llama")), output=output, force=True))
    assert {p.name: p.read_bytes() for p in output.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["llama"]


def test_interrupted_cli_export(tmp_path: Path, env: dict[str, str]) -> None:
    prelude = (
        "from fastllm.export import validate\n"
        "def interrupt(*args, **kwargs):\n"
        "    raise KeyboardInterrupt\n"
        "validate.check_greedy = interrupt"
    )
    result = run_fastllm("export", tiny_models.build("llama"), "--models-dir", tmp_path / "models", env=env,
                         cwd=tmp_path, prelude=prelude)
    assert result.returncode == 130, result.stderr[-2000:]
    assert "interrupted" in result.stderr and "Traceback" not in result.stderr
    assert list((tmp_path / "models").iterdir()) == []


def test_staging_of_a_killed_export_is_removed(tmp_path: Path) -> None:
    """A staging folder whose process is gone (kill -9) is cleaned up by the next export to that output;
    one whose process still runs is left alone."""
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    models = tmp_path / "models"
    abandoned = models / f".llama.partial-{int(dead.stdout)}"
    running = models / f".llama.partial-{os.getppid()}"
    for folder in (abandoned, running):
        shutil.copytree(tiny_export("llama"), folder)
    export(ExportOptions(source=str(tiny_models.build("llama")), output=models / "llama", validate=False))
    assert sorted(p.name for p in models.iterdir()) == sorted(["llama", running.name])


def test_export_without_graph_picks_the_fused_graph_where_it_can(tmp_path: Path, env: dict[str, str]) -> None:
    source = tiny_models.build("llama")
    for folder, extra, graph in (("auto", [], "fused"), ("int8", ["--quantize", "int8"], "optimum"),
                                 ("embedder", None, "optimum")):
        args = [tiny_models.build("bert-mean")] if extra is None else [source, *extra]
        result = run_fastllm("export", *args, "--output", tmp_path / "models" / folder, "--no-validate", env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        assert read_manifest(tmp_path / "models" / folder).graph == graph
    listing = run_fastllm("models", "--models-dir", tmp_path / "models", env=env).stdout.splitlines()
    assert listing[0].split()[:4] == ["FOLDER", "MODEL", "ID", "TASK"] and "GRAPH" in listing[0]
    rows = {line.split()[0]: line.split() for line in listing[1:]}
    assert "fused" in rows["auto"] and "optimum" in rows["int8"] and "-" in rows["embedder"]
