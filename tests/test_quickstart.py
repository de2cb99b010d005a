"""The README's first command: set up, serve the default model and answer a chat request."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from conftest import ROOT
from serving import free_port


def test_quickstart_serves_the_default_model_and_answers(smollm2_fused: Path, tmp_path: Path) -> None:
    # The export itself is covered by the export tests; reuse the cached one (the fused fp32 graph that
    # `fastllm export` picks by default) instead of exporting twice.
    (tmp_path / "SmolLM2-135M-Instruct").symlink_to(smollm2_fused)
    env = {**os.environ, "FASTLLM_MODELS_DIR": str(tmp_path), "FASTLLM_SERVER__PORT": str(free_port())}
    done = subprocess.run([str(ROOT / "scripts" / "quickstart.sh"), "--once"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert '"object":"chat.completion"' in done.stdout
    assert "Paris" in done.stdout
