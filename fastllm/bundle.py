"""`fastllm bundle`: a Docker build context and Kubernetes manifests for one exported model.

The image installs only ``fastllm[serve]`` (or ``fastllm[gpu]``), never torch, so it stays a fraction of
the size of a PyTorch serving image. Both start from the same slim Python base: ``fastllm[gpu]`` brings
the CUDA and cuDNN libraries of onnxruntime-gpu's own CUDA major as pip packages, so they cannot disagree
with it the way a CUDA base image pinned here would (onnxruntime-gpu moved from CUDA 12 to 13), and the
NVIDIA container runtime adds the driver. FastLLM itself is copied into the context as
source and installed from there, so a bundle builds the exact version that made it, offline from PyPI
for everything but the serve dependencies.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from string import Template

from fastllm.errors import FastLLMError, OutputExistsError
from fastllm.manifest import read_manifest

PORT = 3000
BASE = "python:3.11-slim-bookworm"

_DOCKERFILE = Template("""\
# syntax=docker/dockerfile:1
# Built by `fastllm bundle`: serves $model_id with ONNX Runtime ($flavour), no torch inside.
FROM $base AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
# The venv gets no pip of its own (24 MB saved): the base image's pip installs into it.
RUN python3 -m venv --without-pip /opt/venv
COPY fastllm-src /src
RUN python3 -m pip --python /opt/venv/bin/python install --no-cache-dir "/src[$extra]"

FROM $base
RUN useradd --create-home --uid 10001 fastllm
COPY --from=build /opt/venv /opt/venv
COPY --chown=fastllm:fastllm model /models/$folder
ENV PATH=/opt/venv/bin:$$PATH \\
    PYTHONUNBUFFERED=1 \\
    FASTLLM_SERVER__HOST=0.0.0.0 \\
    FASTLLM_SERVER__PORT=$port$gpu_env
USER fastllm
WORKDIR /home/fastllm
EXPOSE $port
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \\
    CMD python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/health', timeout=4)"
CMD ["fastllm", "serve", "--model", "/models/$folder"]
""")

# What the NVIDIA container runtime reads to mount the driver and the device into the container.
_GPU_ENV = " \\\n    NVIDIA_VISIBLE_DEVICES=all \\\n    NVIDIA_DRIVER_CAPABILITIES=compute,utility"

_DOCKERIGNORE = """\
**/__pycache__
**/*.pyc
**/.pytest_cache
**/.ruff_cache
"""

_K8S = Template("""\
# Kubernetes manifests for $model_id, from `fastllm bundle`. Push the image built from this folder and set
# `image:` below; scale with the HorizontalPodAutoscaler (each replica is one independent server).
apiVersion: apps/v1
kind: Deployment
metadata:
  name: $name
  labels: {app: $name}
spec:
  replicas: 1
  selector:
    matchLabels: {app: $name}
  template:
    metadata:
      labels: {app: $name}
    spec:
      securityContext: {runAsNonRoot: true, runAsUser: 10001}
      terminationGracePeriodSeconds: 45
      containers:
        - name: fastllm
          image: $image
          ports: [{name: http, containerPort: $port}]
          env:
            - {name: FASTLLM_SERVER__SHUTDOWN_TIMEOUT, value: "30"}
          readinessProbe:
            httpGet: {path: /ready, port: http}
            periodSeconds: 5
          livenessProbe:
            httpGet: {path: /health, port: http}
            initialDelaySeconds: 30
            periodSeconds: 15
          resources:
            requests: {cpu: "$cpu", memory: $memory}
            limits: {memory: $memory_limit$gpu_limit}
---
apiVersion: v1
kind: Service
metadata:
  name: $name
spec:
  selector: {app: $name}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: $name
spec:
  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: $name}
  minReplicas: 1
  maxReplicas: 8
  metrics:
    - type: Resource
      resource:
        name: cpu
        target: {type: Utilization, averageUtilization: 70}
""")


@dataclass(frozen=True)
class BundleResult:
    output: Path
    image: str
    model_bytes: int


def _source_root() -> Path:
    """The FastLLM source tree this code runs from (the bundle installs exactly this version)."""
    package = Path(__file__).resolve().parent
    root = package.parent
    if not (root / "pyproject.toml").is_file():
        raise FastLLMError("fastllm bundle needs FastLLM's source tree (pyproject.toml beside the package)")
    return root


def _k8s_name(model_id: str) -> str:
    cleaned = "".join(c if c.isalnum() else "-" for c in model_id.split("/")[-1].lower()).strip("-")
    return ("fastllm-" + cleaned)[:63].rstrip("-")


def bundle(model_dir: Path, output: Path, *, gpu: bool = False, force: bool = False,
           image: str | None = None) -> BundleResult:
    manifest = read_manifest(model_dir)
    if output.exists():
        if not force:
            raise OutputExistsError(f"{output} already exists; pass --force to replace it")
        shutil.rmtree(output)
    output.mkdir(parents=True)
    root = _source_root()
    source = output / "fastllm-src"
    shutil.copytree(root / "fastllm", source / "fastllm",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(root / name, source / name)
    shutil.copytree(model_dir, output / "model", symlinks=False)
    folder = model_dir.resolve().name
    name = _k8s_name(manifest.name)
    image = image or f"{name}:latest"
    (output / "Dockerfile").write_text(_DOCKERFILE.substitute(
        model_id=manifest.name, flavour="CUDA" if gpu else "CPU", base=BASE, gpu_env=_GPU_ENV if gpu else "",
        extra="gpu" if gpu else "serve", folder=folder, port=PORT,
    ))
    (output / ".dockerignore").write_text(_DOCKERIGNORE)
    model_bytes = sum(p.stat().st_size for p in (output / "model").rglob("*") if p.is_file())
    memory_mb = max(512, int(model_bytes * 2.5 / 1e6))
    (output / "kubernetes.yaml").write_text(_K8S.substitute(
        model_id=manifest.name, name=name, image=image, port=PORT, cpu="2", memory=f"{memory_mb}Mi",
        memory_limit=f"{int(memory_mb * 1.5)}Mi", gpu_limit=", nvidia.com/gpu: 1" if gpu else "",
    ))
    return BundleResult(output=output, image=image, model_bytes=model_bytes)
