"""The int8 prompt graph of fused int4 exports: made and measured at export, used for prompts only, and giving a
prompt's KV the same bits however the prompt is read (whole, in chunks, batched, after a cached prefix)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tiny_models
from conftest import tiny_export
from test_prefix_cache import _greedy

from fastllm.config import ModelConfig, RuntimeConfig
from fastllm.errors import ExportError
from fastllm.export import prefill_graph
from fastllm.export.pipeline import ExportOptions, export
from fastllm.manifest import read_manifest
from fastllm.runtime.decoder import Decoder
from fastllm.runtime.models import ServedModel, load_model


def test_the_int4_export_has_a_prompt_graph_measured_against_pytorch(smollm2_fused_int4: Path) -> None:
    manifest = read_manifest(smollm2_fused_int4)
    assert manifest.prefill_file == "prefill.onnx"
    assert {"prefill.onnx", "prefill.onnx.data"} <= set(manifest.files)
    decode, prompt = manifest.quality, manifest.prefill_quality
    assert decode is not None and prompt is not None
    assert prompt.reference_perplexity == decode.reference_perplexity
    # W8A8 with smoothing stays within a few percent of the int4 graph (measured: +0.5% on 2k tokens)
    assert prompt.perplexity < decode.perplexity * 1.1
    assert prompt.top1_agreement > decode.top1_agreement - 0.1


def test_a_prompt_gives_the_same_bits_whole_in_chunks_and_batched(smollm2_fused_int4: Path) -> None:
    decoder = Decoder(smollm2_fused_int4, read_manifest(smollm2_fused_int4), threads=1)
    assert decoder.has_prefill_graph
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(100, 20000, 300)]
    whole = decoder.prefill([prompt])
    buffers, done = decoder.kv_buffers(len(prompt) + 8), 0
    for size in (100, 8, 2, 190):  # chunk sizes the engine picks, down to its floor and below
        out = decoder.prefill_after(prompt[: done + size], done, buffers, in_place=True)
        buffers, done = out.present, done + size
    assert np.array_equal(out.logits, whole.logits)
    assert all(np.array_equal(b[:, :, : len(prompt)], w) for b, w in zip(buffers, whole.present, strict=True))
    after_prefix = decoder.prefill_after(prompt, 200, [w[:, :, :200] for w in whole.present])
    assert np.array_equal(after_prefix.logits, whole.logits)
    batched = decoder.prefill([[int(t) for t in rng.integers(100, 20000, 37)], prompt])
    assert all(np.array_equal(b[1:, :, : len(prompt)], w) for b, w in zip(batched.present, whole.present, strict=True))
    # the logits to the last bits: the int4 vocabulary projection has a one-row kernel of its own on some CPUs
    assert np.abs(batched.logits[1] - whole.logits[0]).max() <= decoder.one_row_drift(prompt=True) + 1e-5


def test_prompts_go_through_the_prompt_graph_and_decode_steps_through_int4(smollm2_fused_int4: Path) -> None:
    manifest = read_manifest(smollm2_fused_int4)
    with_graph = Decoder(smollm2_fused_int4, manifest, threads=1)
    without = Decoder(smollm2_fused_int4, manifest, threads=1, prefill_graph=False)
    assert not without.has_prefill_graph
    prompt = [1, 4093, 314, 253, 1345, 30, 2, 198, 1, 520, 9531, 198, 1780, 314, 260, 3575, 282, 4649, 47]
    ours, theirs = with_graph.prefill([prompt]), without.prefill([prompt])
    assert not np.array_equal(ours.logits, theirs.logits)  # int8 arithmetic, not the int4 graph's
    assert int(ours.logits.argmax()) == int(theirs.logits.argmax())
    # one decode step on the same KV: the same graph in both, so the same bits
    token = np.asarray([[int(ours.logits.argmax())]], dtype=np.int64)
    mask = np.ones((1, len(prompt) + 1), dtype=np.int64)
    position = np.asarray([[len(prompt)]], dtype=np.int64)
    step = [d.forward(token, mask, position, ours.present).logits for d in (with_graph, without)]
    assert np.array_equal(step[0], step[1])


def test_the_next_turn_reuses_the_prompt_and_answers_as_without_the_cache(smollm2_fused_int4: Path) -> None:
    """An answer's KV came from decode steps, whose last bits differ from the prompt graph's for the same tokens:
    the next turn reuses its own earlier prompt and reads the answer again, so its tokens equal the cache-off ones."""
    def load(prefix_cache_mb: int) -> ServedModel:
        return load_model(ModelConfig(model_id=str(smollm2_fused_int4)),
                          RuntimeConfig(threads=1, prefix_cache_mb=prefix_cache_mb), smollm2_fused_int4.parent)

    off, on = load(0), load(64)
    try:
        encode = on.tokenizer.encode
        first = encode("<|im_start|>system\n" + "You answer briefly and precisely. " * 8 + "<|im_end|>\n"
                       "<|im_start|>user\nTell me about the sea.<|im_end|>\n<|im_start|>assistant\n",
                       add_special_tokens=False)
        answer, _ = _greedy(on, first, tokens=24)
        second = [*first, *answer, *encode("<|im_end|>\n<|im_start|>user\nAnd rivers?<|im_end|>\n",
                                           add_special_tokens=False)]
        expected, _ = _greedy(off, second, tokens=16)
        got, cached = _greedy(on, second, tokens=16)
        assert got == expected
        block = on.generator.prefix_cache.block
        assert cached == len(first) // block * block > 0
    finally:
        off.close()
        on.close()


def test_serving_can_leave_the_prompt_graph_unloaded(smollm2_fused_int4: Path) -> None:
    model = load_model(ModelConfig(model_id=str(smollm2_fused_int4)), RuntimeConfig(threads=1, prefill_graph=False),
                       smollm2_fused_int4.parent)
    try:
        assert not model.generator.decoder.has_prefill_graph
    finally:
        model.close()


def test_exports_choose_the_prompt_graph() -> None:
    assert read_manifest(tiny_export("llama", graph="fused", quantize="int4")).prefill_file == "prefill.onnx"
    none = tiny_export("llama", graph="fused", quantize="int4", prefill_graph="none")
    assert read_manifest(none).prefill_file == "" and not (none / "prefill.onnx").exists()
    assert read_manifest(tiny_export("llama", graph="fused")).prefill_file == ""  # fp32: nothing to win
    with pytest.raises(ExportError, match="--prefill-graph int8 goes with"):
        export(ExportOptions(source=str(tiny_models.build("llama")), graph="optimum", quantize="int4",
                             prefill_graph="int8"))


def test_the_smoothing_is_folded_where_it_is_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each input's smoothing is folded into the norm weights or the up projection's columns, leaving a Mul only on
    the attention output (one per layer), and the folded graph computes what the Muls did: the same row scales,
    so the same int8 arithmetic but for float rounding."""
    import onnx
    import onnxruntime as ort

    source = tiny_export("llama", graph="fused", quantize="int4")
    built: dict[bool, Path] = {}
    for fold in (True, False):
        folder = tmp_path / str(fold)
        folder.mkdir()
        for file in ("model.onnx", "model.onnx.data", "tokenizer.json"):
            shutil.copy(source / file, folder / file)
        if not fold:
            monkeypatch.setattr(prefill_graph, "_foldable", lambda *args: ({}, {}))
        graph = prefill_graph.build(folder / "model.onnx", folder / "tokenizer.json", 64)
        assert graph is not None
        built[fold] = graph
    nodes = onnx.load(str(built[True]), load_external_data=False).graph.node
    layers = sum(node.op_type == "GroupQueryAttention" for node in nodes)
    smoothing = [node.input[0] for node in nodes if node.name.endswith("/w8a8/smooth")]
    assert layers > 0 and len(smoothing) == layers
    assert all(node.op_type == "GroupQueryAttention" for node in nodes for name in smoothing if name in node.output)
    unfolded = onnx.load(str(built[False]), load_external_data=False).graph.node
    assert sum(node.name.endswith("/w8a8/smooth") for node in unfolded) == 4 * layers  # qkv, o, gate/up, down

    prompt = np.asarray([[5, 17, 42, 99, 3, 64, 8, 120, 7, 33, 250, 1]], dtype=np.int64)
    logits = []
    for graph in (built[True], built[False]):
        session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
        feeds: dict[str, np.ndarray] = {"input_ids": prompt, "attention_mask": np.ones_like(prompt)}
        for spec in session.get_inputs():
            if spec.name.startswith("past_key_values."):
                feeds[spec.name] = np.zeros((1, spec.shape[1], 0, spec.shape[3]), dtype=np.float32)
            elif spec.name == "num_logits_to_keep":
                feeds[spec.name] = np.asarray([prompt.shape[1]], dtype=np.int64)
        logits.append(session.run(["logits"], feeds)[0])
    spread = float(np.abs(logits[1]).max())
    assert np.abs(logits[0] - logits[1]).max() < 0.02 * spread, np.abs(logits[0] - logits[1]).max() / spread
    assert np.array_equal(logits[0].argmax(-1), logits[1].argmax(-1))
