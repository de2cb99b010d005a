"""`fastllm export` on tiny random checkpoints of every supported architecture.

Each export runs the real pipeline (optimum → ONNX → validation against PyTorch) and is cached in
`.cache/test-exports/`; the tests then check the result independently of the exporter's own
validation: manifest facts against the transformers config, the ONNX graph's KV-cache layout, and
greedy tokens of ONNX Runtime against a plain PyTorch loop.
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import onnx
import pytest
import tiny_models
from conftest import tiny_export

from fastllm.export.pipeline import TOOLS, ExportOptions, default_output
from fastllm.export.sources import Checkpoint
from fastllm.manifest import LOGITS_TO_KEEP, MANIFEST_NAME, read_manifest, sha256_file

CAUSAL = list(tiny_models.CAUSAL)
EMBEDDERS = list(tiny_models.EMBEDDERS)
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def _source_config(name: str) -> dict[str, Any]:
    return json.loads((tiny_models.build(name) / "config.json").read_text())


def _graph_io(folder: Path) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph

    def dims(value: onnx.ValueInfoProto) -> list[Any]:
        return [d.dim_value or d.dim_param for d in value.type.tensor_type.shape.dim]

    return {i.name: dims(i) for i in graph.input}, {o.name: dims(o) for o in graph.output}


def _assert_checksums(folder: Path) -> None:
    manifest = read_manifest(folder)
    on_disk = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST_NAME)
    assert sorted(manifest.files) == on_disk
    for name, digest in manifest.files.items():
        assert sha256_file(folder / name) == digest, name


def _torch_greedy(model: Any, prompt: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    """Greedy without a KV cache or eos: the slowest, least clever reference there is."""
    import torch

    ids = list(prompt)
    first_logits = None
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids])).logits[0, -1].numpy()
            first_logits = logits if first_logits is None else first_logits
            ids.append(int(np.argmax(logits)))
    return ids[len(prompt):], first_logits  # type: ignore[return-value]


@pytest.mark.parametrize("name", CAUSAL)
def test_causal_manifest(name: str) -> None:
    folder = tiny_export(name)
    manifest = read_manifest(folder)
    config = _source_config(name)
    _, add_bos, model_type, architecture = tiny_models.CAUSAL[name]
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())

    assert manifest.task == "text-generation"
    assert manifest.architecture == architecture
    assert manifest.model_type == model_type
    assert (manifest.dtype, manifest.quantization, manifest.quality) == ("fp32", "none", None)
    assert manifest.num_layers == config["num_hidden_layers"] == 2
    assert manifest.num_kv_heads == config["num_key_value_heads"] == 2
    assert manifest.head_dim == (32 if name == "gemma" else config["hidden_size"] // config["num_attention_heads"])
    assert manifest.vocab_size == config["vocab_size"]
    # LongRoPE: only the original window, the one the traced graph reproduces (see the test below).
    assert manifest.context_length == (64 if name == "phi3-longrope" else 256)
    im_end = config["eos_token_id"]
    assert manifest.eos_token_ids == [im_end]
    assert tokenizer_config["eos_token"] == tiny_models.IM_END
    assert manifest.bos_token_id == config["bos_token_id"]
    assert manifest.pad_token_id == config["pad_token_id"]
    assert manifest.add_bos_token is add_bos
    assert manifest.pooling is None and manifest.embedding_dim is None
    assert manifest.source == str(tiny_models.build(name).resolve())
    assert manifest.tools == {tool: metadata.version(tool) for tool in TOOLS}
    _assert_checksums(folder)


@pytest.mark.parametrize("name", CAUSAL)
def test_causal_graph_has_kv_cache(name: str) -> None:
    folder = tiny_export(name)
    manifest = read_manifest(folder)
    inputs, outputs = _graph_io(folder)
    layers = range(manifest.num_layers)
    past = {f"past_key_values.{i}.{kind}" for i in layers for kind in ("key", "value")}
    present = {f"present.{i}.{kind}" for i in layers for kind in ("key", "value")}
    assert set(inputs) == {"input_ids", "attention_mask", "position_ids", LOGITS_TO_KEEP, *past}
    assert set(outputs) == {"logits", *present}
    for name_ in past:
        assert inputs[name_][1] == manifest.num_kv_heads and inputs[name_][3] == manifest.head_dim
    for name_ in present:
        assert outputs[name_][1] == manifest.num_kv_heads and outputs[name_][3] == manifest.head_dim
    assert outputs["logits"][2] == manifest.vocab_size


@pytest.mark.parametrize("name", CAUSAL)
def test_causal_greedy_matches_pytorch(name: str) -> None:
    """32 greedy tokens through the server's Decoder + KV cache equal an uncached PyTorch loop."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastllm.export.validate import GREEDY_TOKENS, greedy_onnx
    from fastllm.runtime.decoder import Decoder

    folder = tiny_export(name)
    manifest = read_manifest(folder)
    source = tiny_models.build(name)

    # The prompt as serve builds it: the exported template rendered, encoded by tokenizer.json alone.
    template = jinja2.Environment().from_string((folder / "chat_template.jinja").read_text())
    text = template.render(messages=MESSAGES, add_generation_prompt=True, bos_token=tiny_models.BOS)
    prompt = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    reference_tokenizer = AutoTokenizer.from_pretrained(source)
    assert prompt == list(reference_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True))

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    expected, expected_logits = _torch_greedy(model, prompt, GREEDY_TOKENS)
    decoder = Decoder(folder, manifest, providers=["CPUExecutionProvider"])
    assert greedy_onnx(decoder, prompt, GREEDY_TOKENS, eos=set()) == expected

    ids = np.asarray([prompt], dtype=np.int64)
    out = decoder.forward(ids, np.ones_like(ids), np.arange(len(prompt))[None, :], decoder.empty_past(1))
    np.testing.assert_allclose(out.logits[0], expected_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", CAUSAL)
def test_cache_padding_does_not_move_positions(name: str) -> None:
    """A row whose cache gains left padding (as when a longer row joins the batch) decodes the same.

    Needs a ``position_ids`` input: a graph that numbers positions by cache length (optimum's Gemma
    config) would see the next token 3 positions too far away and change the logits.
    """
    from fastllm.runtime.decoder import Decoder

    folder = tiny_export(name)
    manifest = read_manifest(folder)
    assert manifest.has_position_ids
    decoder = Decoder(folder, manifest, providers=["CPUExecutionProvider"])
    prompt = np.asarray([[5, 17, 42, 99, 7, 64, 120]], dtype=np.int64)
    n = prompt.shape[1]
    first = decoder.forward(prompt, np.ones_like(prompt), np.arange(n)[None, :], decoder.empty_past(1))
    token = np.asarray([[int(np.argmax(first.logits[0]))]])
    plain = decoder.forward(token, np.ones((1, n + 1), dtype=np.int64), np.asarray([[n]]), first.present)
    padded_past = [np.pad(p, ((0, 0), (0, 0), (3, 0), (0, 0))) for p in first.present]
    mask = np.concatenate([np.zeros((1, 3), dtype=np.int64), np.ones((1, n + 1), dtype=np.int64)], axis=1)
    padded = decoder.forward(token, mask, np.asarray([[n]]), padded_past)
    np.testing.assert_allclose(padded.logits, plain.logits, rtol=1e-4, atol=1e-4)


def test_longrope_context_is_the_window_the_graph_reproduces() -> None:
    """Within the manifest's context the graph equals PyTorch; past it, it would not (hence the cap)."""
    import torch
    from transformers import AutoModelForCausalLM

    from fastllm.runtime.decoder import Decoder

    folder = tiny_export("phi3-longrope")
    manifest = read_manifest(folder)
    model = AutoModelForCausalLM.from_pretrained(tiny_models.build("phi3-longrope"), dtype=torch.float32).eval()
    decoder = Decoder(folder, manifest, providers=["CPUExecutionProvider"])
    ids = np.random.RandomState(0).randint(5, manifest.vocab_size, size=(1, 100))

    def max_error(n: int) -> float:
        # The exported graph computes the last position's logits only (see quantize.keep_last_logits).
        ours = decoder.forward(ids[:, :n], np.ones((1, n), dtype=np.int64), np.arange(n)[None, :],
                               decoder.empty_past(1)).logits[0]
        with torch.no_grad():
            reference = model(torch.tensor(ids[:, :n])).logits[0, -1].numpy()
        return float(np.abs(ours - reference).max())

    assert max_error(manifest.context_length) < 1e-3
    assert max_error(100) > 0.1  # the limitation the cap guards against (update if optimum fixes it)


@pytest.mark.parametrize("quantize", ["int4", "int8"])
def test_quantized_graph_uses_matmulnbits_everywhere(quantize: str) -> None:
    """Every linear layer, the tied lm_head included, becomes MatMulNBits; quality is measured."""
    fp32 = tiny_export("llama")
    folder = tiny_export("llama", quantize=quantize)
    manifest = read_manifest(folder)
    assert (manifest.quantization, manifest.dtype, manifest.name) == (quantize, "fp32", f"llama-{quantize}")
    assert manifest.quality is not None
    # A random model's next-token distribution is nearly flat, so agreement says little here; the
    # SmolLM2 tests hold real thresholds.
    assert 0 <= manifest.quality.top1_agreement <= 1
    assert manifest.quality.perplexity > 0 and manifest.quality.reference_perplexity > 0

    graph = onnx.load(str(folder / "model.onnx")).graph
    initializers = {init.name for init in graph.initializer}
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    per_layer = 7  # q, k, v, o, gate, up, down
    assert len(nbits) == per_layer * manifest.num_layers + 1
    assert {a.i for n in nbits for a in n.attribute if a.name == "bits"} == {int(quantize[3:])}
    lm_head = next(n for n in graph.node if "logits" in n.output)
    assert lm_head.op_type == "MatMulNBits"
    assert not [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in initializers]
    assert not [n.name for n in graph.node if n.op_type == "Transpose" and n.input[0] in initializers]
    # The embedding stays for the Gather; the lm_head's copy exists only in quantized form.
    assert sum(1 for init in graph.initializer if tuple(init.dims) == (manifest.vocab_size, 64)) == 1
    assert (folder / "model.onnx").stat().st_size < 0.75 * (fp32 / "model.onnx").stat().st_size
    _assert_checksums(folder)


def test_fp16_export_runs_on_cpu() -> None:
    """fp16 keeps fp32 inputs/outputs, so the runtime feeds it like fp32; quality is measured."""
    folder = tiny_export("qwen2", dtype="fp16")
    manifest = read_manifest(folder)
    assert (manifest.dtype, manifest.quantization, manifest.name) == ("fp16", "none", "qwen2-fp16")
    assert manifest.quality is not None and manifest.quality.top1_agreement >= 0.8
    graph = onnx.load(str(folder / "model.onnx")).graph
    assert {init.data_type for init in graph.initializer if len(init.dims) == 2} == {onnx.TensorProto.FLOAT16}
    inputs = {i.name: i.type.tensor_type.elem_type for i in graph.input}
    assert inputs["past_key_values.0.key"] in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)


@pytest.mark.parametrize("name", EMBEDDERS)
def test_embedding_export(name: str) -> None:
    from sentence_transformers import SentenceTransformer
    from tokenizers import Tokenizer

    from fastllm.runtime.embedding import EmbeddingEngine

    folder = tiny_export(name)
    manifest = read_manifest(folder)
    spec = tiny_models.EMBEDDERS[name]
    assert manifest.task == "embedding"
    assert (manifest.architecture, manifest.model_type) == ("BertModel", "bert")
    assert manifest.pooling == spec["pooling"]
    assert manifest.normalize is spec["normalize"]
    assert manifest.embedding_dim == 64
    assert manifest.context_length == tiny_models.MAX_SEQ_LENGTH
    assert manifest.eos_token_ids == []
    _assert_checksums(folder)
    inputs, outputs = _graph_io(folder)
    assert set(inputs) == {"input_ids", "attention_mask", "token_type_ids"}
    assert next(iter(outputs)) == "last_hidden_state"

    # Serve's path: tokenizer.json (truncating at the manifest's context length) + engine + pooling.
    texts = ["the capital of france is paris", "a short one", " ".join(tiny_models.CORPUS)]
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.enable_truncation(manifest.context_length)
    ids = [e.ids for e in tokenizer.encode_batch(texts)]
    assert len(ids[-1]) == tiny_models.MAX_SEQ_LENGTH  # the long text really is truncated
    engine = EmbeddingEngine(folder, manifest, providers=["CPUExecutionProvider"])
    try:
        ours = engine.run_batch(ids)
    finally:
        engine.close()
    reference = SentenceTransformer(str(tiny_models.build(name)), device="cpu").encode(texts)
    cosine = np.sum(ours * reference, axis=1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(reference, axis=1))
    assert cosine.min() >= 0.9999
    if spec["normalize"]:
        np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    else:
        np.testing.assert_allclose(ours, reference, rtol=1e-3, atol=1e-4)


def test_validation_rejects_a_graph_that_differs_from_pytorch() -> None:
    """The exact-greedy check is not vacuous: another model's weights behind the same graph fail it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastllm.errors import ExportError
    from fastllm.export.validate import check_greedy, reference

    folder = tiny_export("llama")
    manifest = read_manifest(folder)
    source = tiny_models.build("llama")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    check_greedy(folder, manifest, reference(model, tokenizer, manifest, quality=False), tokenizer)  # the real pair
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(-1.5)
    with pytest.raises(ExportError, match="greedy tokens differ"):
        check_greedy(folder, manifest, reference(model, tokenizer, manifest, quality=False), tokenizer)


def test_a_gguf_named_by_a_hash_is_named_by_its_metadata(tmp_path: Path, smollm2_gguf: Path) -> None:
    """Ollama keeps GGUFs as sha256-<hex> blobs: such a file is named by its `general.name`; a published file
    keeps its own name, without the quantization suffix."""
    from fastllm.export.sources import resolve

    blob = tmp_path / f"sha256-{'0a' * 32}"
    blob.symlink_to(smollm2_gguf)
    (tmp_path / "renamed.gguf").symlink_to(blob)
    (tmp_path / "model.gguf").symlink_to(smollm2_gguf)
    named = {path: resolve(str(tmp_path / path), revision=None, token=None, task="auto").name
             for path in (blob.name, "renamed.gguf", "model.gguf")}
    assert named == {blob.name: "Smollm2-135M-8k-Lc100K-Mix1-Ep2", "renamed.gguf": "renamed",
                     "model.gguf": "Smollm2-135M-8k-Lc100K-Mix1-Ep2"}
    assert resolve(str(smollm2_gguf), revision=None, token=None, task="auto").name == "SmolLM2-135M-Instruct"


def test_default_output_folder_names() -> None:
    checkpoint = Checkpoint(source="org/Model-1B", name="org/Model-1B", folder=Path("."))
    assert default_output(ExportOptions(source="x"), checkpoint) == Path("models/Model-1B")
    assert default_output(ExportOptions(source="x", quantize="int4"), checkpoint) == Path("models/Model-1B-int4")
    assert default_output(ExportOptions(source="x", dtype="fp16", models_dir=Path("m")), checkpoint) == Path(
        "m/Model-1B-fp16"
    )
