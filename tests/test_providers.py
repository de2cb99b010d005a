"""Execution providers: the pure choice, and real session creation with a logged fallback."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from fastllm.errors import ConfigError, ModelLoadError
from fastllm.runtime.providers import (
    CPU,
    _option_values,
    choose_providers,
    create_session,
    physical_cores,
    session_options,
)

ROOT = Path(__file__).resolve().parent.parent
CUDA = "CUDAExecutionProvider"
COREML = "CoreMLExecutionProvider"
ROCM = "ROCMExecutionProvider"
AZURE = "AzureExecutionProvider"


@pytest.fixture
def add_model(tmp_path: Path) -> Path:
    """A one-node ONNX graph, c = a + b, in its own model folder."""
    from onnx import TensorProto, helper, save

    tensor = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["n"])  # noqa: E731
    graph = helper.make_graph([helper.make_node("Add", ["a", "b"], ["c"])], "add",
                              [tensor("a"), tensor("b")], [tensor("c")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "tiny-add" / "model.onnx"
    path.parent.mkdir()
    save(model, str(path))
    return path


def _runs(session: ort.InferenceSession) -> None:
    a = np.array([1.0, 2.0], dtype=np.float32)
    (c,) = session.run(None, {"a": a, "b": a})
    np.testing.assert_allclose(c, [2.0, 4.0])


# --- choose_providers: a pure function of what onnxruntime offers ----------------------------------

@pytest.mark.parametrize(("available", "expected"), [
    ([CUDA, CPU], [CUDA, CPU]),
    ([CPU, CUDA], [CUDA, CPU]),  # our preference, not the build's listing order
    ([COREML, CPU], [COREML, CPU]),
    ([CPU], [CPU]),
    ([ROCM, CPU], [ROCM, CPU]),
    ([AZURE, CPU], [CPU]),  # Azure is a remote-inference EP, never picked automatically
    ([AZURE, CUDA, CPU], [CUDA, CPU]),
    (["TensorrtExecutionProvider", CUDA, CPU], [CUDA, CPU]),  # TensorRT is opt-in (slow engine builds)
    ([], [CPU]),
])
def test_auto_ranks_the_available_providers(available: list[str], expected: list[str]) -> None:
    assert choose_providers("auto", available) == expected


def test_explicit_list_is_kept_in_order_with_cpu_appended() -> None:
    assert choose_providers([CUDA], [CUDA, CPU]) == [CUDA, CPU]
    assert choose_providers([CPU, CUDA], [CUDA, CPU]) == [CPU, CUDA]
    assert choose_providers([AZURE], [AZURE, CPU]) == [AZURE, CPU]  # explicit asks are honoured
    assert choose_providers([], [CUDA, CPU]) == [CPU]


def test_explicit_list_is_cleaned() -> None:
    assert choose_providers([" CUDAExecutionProvider", CUDA, ""], [CUDA, CPU]) == [CUDA, CPU]
    # A bare string is one provider (or a comma-separated list), never a sequence of characters.
    assert choose_providers(CUDA, [CUDA, CPU]) == [CUDA, CPU]
    assert choose_providers(f"{CUDA}, {CPU}", [CUDA, CPU]) == [CUDA, CPU]
    assert choose_providers("AUTO", [CUDA, CPU]) == [CUDA, CPU]


def test_unknown_cuda_provider_says_how_to_install_it() -> None:
    with pytest.raises(ConfigError) as info:
        choose_providers([CUDA], [AZURE, CPU])
    message = info.value.message
    assert "fastllm[gpu]" in message
    assert "onnxruntime-gpu" in message
    assert CUDA in message and "runtime.providers" in message


def test_unknown_provider_lists_what_is_available() -> None:
    with pytest.raises(ConfigError) as info:
        choose_providers(["NoSuchExecutionProvider"], [AZURE, CPU])
    assert "NoSuchExecutionProvider" in info.value.message
    assert CPU in info.value.message
    assert "fastllm[gpu]" not in info.value.message


# --- threads --------------------------------------------------------------------------------------

def test_physical_cores_is_sane() -> None:
    cores = physical_cores()
    assert 1 <= cores <= (os.cpu_count() or 1)


def test_session_options_default_threads_are_physical_cores() -> None:
    options = session_options(0)
    assert options.intra_op_num_threads == physical_cores() >= 1
    assert options.inter_op_num_threads == 1
    assert session_options(3).intra_op_num_threads == 3


def test_whole_float_provider_options_are_sent_as_integers() -> None:
    # TOML `gpu_mem_limit = 4e9` is a float; ORT stringifies it and integer options reject "4000000000.0".
    assert _option_values({"gpu_mem_limit": 4e9, "device_id": 0, "ratio": 0.5, "mode": "x"}) == {
        "gpu_mem_limit": 4_000_000_000, "device_id": 0, "ratio": 0.5, "mode": "x"
    }


# --- create_session: real sessions, real failures ----------------------------------------------------

def test_cpu_session_runs(add_model: Path) -> None:
    loaded = create_session(add_model, requested=[CPU], threads=1)
    assert loaded.provider == CPU
    _runs(loaded.session)


def test_auto_on_this_build(add_model: Path) -> None:
    loaded = create_session(add_model, requested="auto", threads=1)
    assert loaded.provider == choose_providers("auto", ort.get_available_providers())[0]
    _runs(loaded.session)


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_provider_failing_at_session_creation_falls_back_to_cpu_with_a_warning(
    add_model: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    # A build that lists ROCm but cannot start it: onnxruntime itself raises when the session is created
    # ("Unknown Provider Type" in 1.32), exactly like a GPU provider whose libraries are missing.
    real = ort.get_available_providers()
    if ROCM in real:
        pytest.skip("this onnxruntime really has ROCm")
    monkeypatch.setattr(ort, "get_available_providers", lambda: [ROCM, *real])
    with caplog.at_level(logging.WARNING, logger="fastllm.runtime.providers"):
        loaded = create_session(add_model, requested=[ROCM], threads=1)
    assert loaded.provider == CPU
    _runs(loaded.session)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings, "the fallback must be logged"
    assert ROCM in warnings[0].getMessage()
    assert "tiny-add" in warnings[0].getMessage()
    # onnxruntime's own fallback prints "EP Error" to stdout; ours is a log record instead.
    assert "EP Error" not in capfd.readouterr().out


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_provider_silently_dropped_by_onnxruntime_is_still_reported(
    add_model: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    # A CPU-only onnxruntime given CUDA creates the session on the CPU without raising.
    real = ort.get_available_providers()
    if CUDA in real:
        pytest.skip("this onnxruntime really has CUDA")
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, *real])
    with caplog.at_level(logging.WARNING, logger="fastllm.runtime.providers"):
        loaded = create_session(add_model, requested="auto", threads=1)
    assert loaded.provider == CPU
    assert any(r.levelno == logging.WARNING and CUDA in r.getMessage() and CPU in r.getMessage()
               for r in caplog.records)


def test_a_model_no_provider_can_load_is_a_model_load_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    broken = tmp_path / "broken" / "model.onnx"
    broken.parent.mkdir()
    broken.write_bytes(b"this is not an onnx protobuf")
    with caplog.at_level(logging.WARNING, logger="fastllm.runtime.providers"), \
            pytest.raises(ModelLoadError, match="no execution provider could load"):
        create_session(broken, requested=[CPU], threads=1)
    assert any(CPU in r.getMessage() for r in caplog.records)


def test_unknown_explicit_provider_is_a_config_error_before_any_session(add_model: Path) -> None:
    with pytest.raises(ConfigError, match="NoSuchExecutionProvider"):
        create_session(add_model, requested=["NoSuchExecutionProvider"])


# --- GPU ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_auto_picks_cuda_on_a_gpu_machine(add_model: Path) -> None:
    loaded = create_session(add_model, requested="auto", threads=1)
    assert loaded.provider == CUDA
    assert loaded.session.get_providers()[0] == CUDA
    _runs(loaded.session)


def test_gpu_marker_is_skipped_without_a_gpu() -> None:
    """tests/conftest.py's hook: without CUDA (and without FASTLLM_TEST_GPU) gpu tests skip, not fail."""
    if os.environ.get("FASTLLM_TEST_GPU") or CUDA in ort.get_available_providers():
        pytest.skip("a GPU may be present; the hook lets gpu tests run here")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", f"{__file__}::test_auto_picks_cuda_on_a_gpu_machine", "-q", "-rs",
         "-p", "no:cacheprovider"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 skipped" in result.stdout
    assert "needs a CUDA GPU" in result.stdout
