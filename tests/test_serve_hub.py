"""`fastllm serve --model org/repo` straight from a hub (a fake one on loopback): FastLLM exports and
plain ONNX repos in onnx-community's layout, downloaded with huggingface_hub and served without torch."""

from __future__ import annotations

from pathlib import Path

import openai
from conftest import tiny_export
from fakehub import FakeHub, folder_files, hub_env
from serving import run_server


def test_serve_hub_repos_of_onnx_files(tmp_path: Path) -> None:
    export = tiny_export("llama")
    files = folder_files(export)
    plain = {("onnx/" + name if name.startswith("model.onnx") else name): data for name, data in files.items()
             if name != "fastllm.json"}
    plain["onnx/model_q4.onnx"] = b"a variant the server must not download"
    with FakeHub() as hub:
        hub.add_commit("fastllm-org/tiny-llama", files)
        hub.add_commit("onnx-community/tiny-llama-ONNX", plain)
        env = {k: v for k, v in hub_env(tmp_path, hub.url).items() if k.startswith("HF_")}
        args = ["--model", "fastllm-org/tiny-llama", "--model", "onnx-community/tiny-llama-ONNX",
                "--models-dir", str(tmp_path / "empty")]
        with run_server(args, env=env, log_dir=tmp_path) as server:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
            ids = {m.id for m in client.models.list()}
            manifest_name = next(iter(ids - {"onnx-community/tiny-llama-ONNX"}))
            assert "onnx-community/tiny-llama-ONNX" in ids
            answers = []
            for model in sorted(ids):
                reply = client.completions.create(model=model, prompt="hello world", max_tokens=6, temperature=0)
                assert reply.usage.completion_tokens >= 1
                answers.append(reply.choices[0].text)
            # The same weights behind both layouts answer alike.
            assert answers[0] == answers[1], (manifest_name, answers)
        assert "onnx/model_q4.onnx" not in hub.downloaded("onnx-community/tiny-llama-ONNX")
        assert "onnx/model.onnx" in hub.downloaded("onnx-community/tiny-llama-ONNX")
