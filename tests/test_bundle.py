"""`fastllm bundle`: the files it writes, and the slim install they describe, for real.

No Docker engine runs here, so the image itself is not built; instead the test does what its Dockerfile
does — a fresh virtual environment with only `fastllm[serve]` from the bundled source — measures it,
proves torch & co. are absent, and serves the bundled model from it.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import httpx
import pytest
import yaml
from serving import free_port, run_server

from fastllm.bundle import bundle
from fastllm.errors import OutputExistsError

# onnxruntime (78 MB) and numpy (73 MB, which onnxruntime itself requires) alone exceed the 150 MB once
# hoped for; the rest is tokenizers, litestar and its own dependencies, huggingface_hub. This bound
# guards against regressions such as a serve dependency that drags in torch.
SLIM_LIMIT_MB = 260


@pytest.fixture(scope="module")
def cpu_bundle(smollm2_fp32: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("bundle") / "ctx"
    done = subprocess.run([sys.executable, "-m", "fastllm", "bundle", str(smollm2_fp32), "--output", str(output)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "docker build" in done.stdout
    return output


def test_dockerfile_is_multistage_non_root_with_healthcheck(cpu_bundle: Path) -> None:
    dockerfile = (cpu_bundle / "Dockerfile").read_text()
    assert dockerfile.count("\nFROM ") + dockerfile.startswith("FROM ") >= 2
    assert 'install --no-cache-dir "/src[serve]"' in dockerfile
    assert "torch" not in dockerfile.replace("no torch inside", "")
    assert "\nUSER fastllm\n" in dockerfile
    assert "HEALTHCHECK" in dockerfile and "/health" in dockerfile
    assert "EXPOSE 3000" in dockerfile
    model_folder = next(line for line in dockerfile.splitlines() if line.startswith("COPY --chown")).split()[-1]
    assert f'CMD ["fastllm", "serve", "--model", "{model_folder}"]' in dockerfile
    assert (cpu_bundle / ".dockerignore").is_file()
    assert (cpu_bundle / "model" / "fastllm.json").is_file()
    assert (cpu_bundle / "fastllm-src" / "pyproject.toml").is_file()


def test_kubernetes_manifests_probe_ready_and_health(cpu_bundle: Path) -> None:
    docs = {d["kind"]: d for d in yaml.safe_load_all((cpu_bundle / "kubernetes.yaml").read_text())}
    assert set(docs) == {"Deployment", "Service", "HorizontalPodAutoscaler"}
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
    assert docs["Deployment"]["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    assert docs["Service"]["spec"]["selector"] == docs["Deployment"]["spec"]["selector"]["matchLabels"]
    assert docs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == docs["Deployment"]["metadata"]["name"]


def test_gpu_bundle_installs_onnxruntime_gpu_with_its_own_cuda_libraries(smollm2_fp32: Path, tmp_path: Path) -> None:
    """No CUDA base image to fall out of step with onnxruntime-gpu's CUDA major: the gpu extra brings CUDA
    and cuDNN as pip packages, and the NVIDIA container runtime mounts the driver."""
    result = bundle(smollm2_fp32, tmp_path / "gpu", gpu=True, image="registry.example/smol:1")
    dockerfile = (result.output / "Dockerfile").read_text()
    assert '"/src[gpu]"' in dockerfile and "nvidia/cuda" not in dockerfile
    assert "NVIDIA_VISIBLE_DEVICES=all" in dockerfile and "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in dockerfile
    extras = tomllib.loads((result.output / "fastllm-src" / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert any(r.startswith("onnxruntime-gpu[cuda,cudnn]") for r in extras["gpu"])
    assert not any(r.startswith("onnxruntime>") for r in extras["gpu"])
    deployment = next(yaml.safe_load_all((result.output / "kubernetes.yaml").read_text()))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example/smol:1"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_existing_output_needs_force(smollm2_fp32: Path, tmp_path: Path) -> None:
    (tmp_path / "ctx").mkdir()
    with pytest.raises(OutputExistsError):
        bundle(smollm2_fp32, tmp_path / "ctx")
    assert bundle(smollm2_fp32, tmp_path / "ctx", force=True).output.is_dir()


def _size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink()) / 1e6


def test_slim_install_has_no_torch_is_small_and_serves_the_bundle(cpu_bundle: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    # As the Dockerfile does: a venv without pip of its own, filled by an outer pip.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                    "--disable-pip-version-check", f"{cpu_bundle / 'fastllm-src'}[serve]"], check=True, timeout=900)
    absent = subprocess.run([str(python), "-c", (
        "import importlib.util, sys;"
        "missing = [m for m in ('torch', 'transformers', 'optimum', 'sentence_transformers')"
        " if importlib.util.find_spec(m) is None];"
        "print(','.join(missing))")], capture_output=True, text=True, check=True)
    assert absent.stdout.strip() == "torch,transformers,optimum,sentence_transformers"
    site = next((venv / "lib").glob("python3*/site-packages"))
    size = _size_mb(site)
    print(f"slim fastllm[serve] install: {size:.1f} MB")
    assert size < SLIM_LIMIT_MB, f"fastllm[serve] takes {size:.1f} MB"

    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "VIRTUAL_ENV": str(venv)}
    port = free_port()
    # Run from an empty folder so that `python -m fastllm` imports the installed copy, not this checkout.
    with run_server(["--model", str(cpu_bundle / "model")], env=env, log_dir=tmp_path, python=str(python),
                    port=port, cwd=tmp_path) as server:
        reply = httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={
            "model": "SmolLM2-135M-Instruct", "temperature": 0, "max_tokens": 20,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]}).json()
    assert "Paris" in reply["choices"][0]["message"]["content"]
