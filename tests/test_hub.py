"""`fastllm export ORG/NAME` against a fake HuggingFace Hub on loopback (tests/fakehub.py).

The real CLI runs in a subprocess with HF_ENDPOINT pointing at the fake hub and a fresh HF_HOME, so
huggingface_hub, its cache layout, its error mapping and our one-line messages are all the real ones.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import tiny_models
from fakehub import FakeHub, assert_clean_failure, folder_files, hub_env, run_fastllm

from fastllm.hub import looks_like_repo_id
from fastllm.manifest import MANIFEST_NAME, read_manifest

REPO = "tiny-org/tiny-llama"
GATED = "tiny-org/gated-llama"
LEGACY = "tiny-org/legacy-llama"
TOKEN = "hf_fake_token_for_tests"


class Hub:
    def __init__(self, server: FakeHub, home: Path) -> None:
        self.server = server
        self.home = home  # tmp folder holding the shared HF_HOME of the module
        self.v1 = ""
        self.main = ""

    def env(self, **extra: str) -> dict[str, str]:
        return hub_env(self.home, self.server.url, **extra)


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    files = folder_files(tiny_models.build("llama"))
    # Not needed for an export, so never downloaded: other frameworks' weights, duplicates, docs.
    files["flax_model.msgpack"] = b"\0" * 1000
    files["consolidated.safetensors"] = b"\0" * 1000
    files["original/params.json"] = b"{}"
    files["README.md"] = b"# tiny llama\n"
    with FakeHub() as server:
        state = Hub(server, tmp_path_factory.mktemp("hub"))
        state.v1 = server.add_commit(REPO, files, refs=("v1.0",))
        # main moved on to something we cannot export, so only --revision v1.0 works.
        broken = {**files, "config.json": json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
                  .encode()}
        state.main = server.add_commit(REPO, broken, refs=("main",))
        server.add_commit(GATED, files, token=TOKEN)
        server.add_commit(LEGACY, _pickled_checkpoint(state.home / "legacy"))
        yield state


def _pickled_checkpoint(folder: Path) -> dict[str, bytes]:
    """The tiny Llama as an old repo has it: pytorch_model.bin, no safetensors."""
    import torch
    from transformers import AutoModelForCausalLM

    source = tiny_models.build("llama")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    model.save_pretrained(folder, safe_serialization=False)
    files = folder_files(folder)
    assert "pytorch_model.bin" in files and not any(name.endswith(".safetensors") for name in files)
    files.update({name: data for name, data in folder_files(source).items() if not name.endswith(".safetensors")})
    files["training_args.bin"] = b"\0" * 100
    return files


@pytest.fixture(scope="module")
def v1_export(hub: Hub) -> Path:
    """One export from the hub by id and revision; later tests reuse its HF cache."""
    output = hub.home / "models" / "tiny-llama"
    result = run_fastllm("export", REPO, "--revision", "v1.0", "--models-dir", hub.home / "models", env=hub.env(),
                         cwd=hub.home)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == str(output)
    return output


def test_export_by_id_and_revision(hub: Hub, v1_export: Path) -> None:
    manifest = read_manifest(v1_export)
    assert (manifest.source, manifest.name, manifest.revision, manifest.commit) == (REPO, REPO, "v1.0", hub.v1)
    assert manifest.model_type == "llama"
    fetched = hub.server.downloaded(REPO)
    assert "model.safetensors" in fetched and "config.json" in fetched and "tokenizer.json" in fetched
    for unwanted in ("flax_model.msgpack", "consolidated.safetensors", "original/params.json", "README.md"):
        assert unwanted not in fetched
    api_calls = [r.path for r in hub.server.requests if r.path.startswith(f"/api/models/{REPO}")]
    assert f"/api/models/{REPO}/revision/v1.0" in api_calls
    assert all(r.authorization is None for r in hub.server.requests)  # no token configured, none sent
    snapshot = hub.home / "hf-home" / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / hub.v1
    assert (snapshot / "model.safetensors").is_file()


def test_default_revision_is_main(hub: Hub, tmp_path: Path) -> None:
    result = run_fastllm("export", REPO, "--output", tmp_path / "out", env=hub.env(), cwd=tmp_path)
    assert_clean_failure(result, "'gpt2' is not supported")
    assert f"/api/models/{REPO}/revision/main" in [r.path for r in hub.server.requests]


def test_unknown_revision(hub: Hub, tmp_path: Path) -> None:
    result = run_fastllm("export", REPO, "--revision", "v9.9", "--output", tmp_path / "out", env=hub.env())
    assert_clean_failure(result, "revision 'v9.9'", "does not exist")


def test_unknown_model(hub: Hub, tmp_path: Path) -> None:
    result = run_fastllm("export", "nobody/no-such-model", "--output", tmp_path / "out", env=hub.env())
    assert_clean_failure(result, "'nobody/no-such-model' was not found on the hub")
    assert not (tmp_path / "out").exists()


def test_gated_without_token(hub: Hub, tmp_path: Path) -> None:
    result = run_fastllm("export", GATED, "--output", tmp_path / "out", env=hub.env())
    assert_clean_failure(result, GATED, "gated", "HF_TOKEN")
    assert not (tmp_path / "out").exists()


def test_gated_with_a_token_without_access(hub: Hub, tmp_path: Path) -> None:
    result = run_fastllm("export", GATED, "--output", tmp_path / "out", env=hub.env(HF_TOKEN="hf_someone_else"))
    assert_clean_failure(result, GATED, "gated", "no access")


def test_gated_with_token(hub: Hub, tmp_path: Path) -> None:
    hub.server.requests.clear()
    result = run_fastllm("export", GATED, "--models-dir", tmp_path / "models", env=hub.env(HF_TOKEN=TOKEN),
                         cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = read_manifest(tmp_path / "models" / "gated-llama")
    assert (manifest.source, manifest.revision) == (GATED, None)
    assert manifest.commit == hub.server.repos[GATED].refs["main"]
    assert {r.authorization for r in hub.server.requests} == {f"Bearer {TOKEN}"}


def test_repo_with_pytorch_bin_weights_only(hub: Hub, tmp_path: Path) -> None:
    result = run_fastllm("export", LEGACY, "--output", tmp_path / "out", "--no-validate", env=hub.env())
    assert result.returncode == 0, result.stderr[-3000:]
    fetched = hub.server.downloaded(LEGACY)
    assert "pytorch_model.bin" in fetched and "training_args.bin" not in fetched
    assert read_manifest(tmp_path / "out").model_type == "llama"


def test_offline_with_empty_cache(hub: Hub, tmp_path: Path) -> None:
    hub.server.requests.clear()
    env = hub_env(tmp_path, hub.server.url, HF_HUB_OFFLINE="1")  # its own, empty HF_HOME
    result = run_fastllm("export", REPO, "--revision", "v1.0", "--output", tmp_path / "out", env=env)
    assert_clean_failure(result, REPO, "not in the local Hugging Face cache", "HF_HUB_OFFLINE")
    assert hub.server.requests == []


def test_offline_with_warm_cache(hub: Hub, v1_export: Path, tmp_path: Path) -> None:
    """After one online export, the same id and revision export again with the network off."""
    hub.server.requests.clear()
    result = run_fastllm("export", REPO, "--revision", "v1.0", "--output", tmp_path / "out",
                         env=hub.env(HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert hub.server.requests == []
    assert read_manifest(tmp_path / "out").files == read_manifest(v1_export).files


def test_hub_unreachable(tmp_path: Path) -> None:
    env = hub_env(tmp_path, "http://127.0.0.1:9")  # discard port: connection refused
    result = run_fastllm("export", REPO, "--output", tmp_path / "out", env=env)
    assert_clean_failure(result, REPO, "cannot be reached")
    assert not list(tmp_path.rglob(MANIFEST_NAME))


@pytest.mark.parametrize(("text", "expected"), [
    ("HuggingFaceTB/SmolLM2-135M-Instruct", True),
    ("sentence-transformers/all-MiniLM-L6-v2", True),
    ("org/model.v2", True),
    ("./models/x", False),
    ("/abs/path", False),
    ("model.gguf", False),
    ("org/model.gguf", False),
    ("a/b/c", False),
    ("just-a-name", False),
])
def test_repo_id_detection(text: str, expected: bool) -> None:
    assert looks_like_repo_id(text) is expected
