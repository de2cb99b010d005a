"""The serving path never imports the export stack, and `fastllm --help` imports almost nothing.

A serve-only install (`fastllm[serve]`) has no torch, transformers, optimum or onnx; an import of any
of them on the serving path would crash there, and costs seconds and gigabytes everywhere else.
Each check runs in a fresh interpreter, so modules other tests imported do not count.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Packages of the `export` extra (and its dependencies) that serving must never touch.
EXPORT_ONLY = ["torch", "transformers", "optimum", "sentence_transformers", "onnx", "onnx_ir", "gguf",
               "accelerate"]
# The serving stack: `--help` must not pay for it.
SERVE_STACK = ["onnxruntime", "numpy", "tokenizers", "litestar", "uvicorn", "huggingface_hub", "jinja2",
               "prometheus_client", "pydantic", "pydantic_settings"]

SERVE_PATH = """
import importlib, json, pkgutil, sys
import fastllm
names = ["fastllm.cli", "fastllm.config", "fastllm.errors", "fastllm.manifest", "fastllm.hub"]
for package in ("fastllm.runtime", "fastllm.tokenization", "fastllm.server"):
    module = importlib.import_module(package)
    names.append(package)
    names += [info.name for info in pkgutil.walk_packages(module.__path__, package + ".")]
for name in names:
    importlib.import_module(name)
assert {"fastllm.server.app", "fastllm.server.run", "fastllm.runtime.providers"} <= set(names)
from fastllm.config import load_settings
from fastllm.server.app import create_app
app = create_app(load_settings())  # built, not started: models load in the lifespan
assert app is not None
print(json.dumps({"imported": names, "modules": sorted(sys.modules)}))
"""

HELP = """
import json, runpy, sys
sys.argv = ["fastllm", "--help"]
try:
    runpy.run_module("fastllm", run_name="__main__")
except SystemExit as exc:
    assert exc.code in (0, None), exc.code
print(json.dumps({"modules": sorted(sys.modules)}))
"""


def _modules_after(code: str, tmp_path: Path) -> dict[str, list[str]]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("FASTLLM_")}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def _loaded(modules: list[str], packages: list[str]) -> list[str]:
    return [p for p in packages if any(m == p or m.startswith(p + ".") for m in modules)]


def test_serve_path_and_app_construction_do_not_import_the_export_stack(tmp_path: Path) -> None:
    found = _modules_after(SERVE_PATH, tmp_path)
    assert len(found["imported"]) > 10
    assert _loaded(found["modules"], EXPORT_ONLY) == []


def test_help_does_not_import_the_serving_stack(tmp_path: Path) -> None:
    found = _modules_after(HELP, tmp_path)
    assert "fastllm.cli" in found["modules"]
    assert _loaded(found["modules"], SERVE_STACK + EXPORT_ONLY) == []
