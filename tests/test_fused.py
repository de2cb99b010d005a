"""The fused decoder graph (GenAI builder): exact at fp32, right-padded continuous batching, int4 quality."""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path

import onnx
import pytest

from fastllm.config import ModelConfig, RuntimeConfig
from fastllm.errors import ExportError
from fastllm.export.pipeline import ExportOptions, export
from fastllm.manifest import read_manifest
from fastllm.runtime.generation import GenerationRequest
from fastllm.runtime.models import ServedModel, load_model
from fastllm.runtime.sampling import SamplingParams

QUESTIONS = ["What is 2+2?", "Name a planet.", "Why is the sky blue?", "Say hi in French.",
             "What is the capital of Spain?", "List three animals.", "What is ice?", "Describe a cat."]


def _ops(folder: Path) -> collections.Counter[str]:
    return collections.Counter(n.op_type for n in onnx.load(folder / "model.onnx", load_external_data=False).graph.node)


def test_fused_graph_uses_group_query_attention_and_no_position_ids(smollm2_fused: Path) -> None:
    manifest = read_manifest(smollm2_fused)
    assert manifest.graph == "fused" and manifest.has_position_ids is False
    ops = _ops(smollm2_fused)
    assert ops["GroupQueryAttention"] == manifest.num_layers
    assert sum(ops.values()) < 1000  # optimum's graph of the same model has over 8000 nodes


def test_fused_int4_is_matmulnbits_with_a_quality_figure(smollm2_fused_int4: Path) -> None:
    manifest = read_manifest(smollm2_fused_int4)
    assert manifest.quantization == "int4" and manifest.quality is not None
    assert manifest.quality.top1_agreement > 0.6
    assert _ops(smollm2_fused_int4)["MatMulNBits"] > 0


def _answers(model: ServedModel, together: bool) -> list[str]:
    engine = model.generator
    assert engine is not None and model.chat_template is not None
    requests = [GenerationRequest(model.tokenizer.encode(model.chat_template.render([{"role": "user", "content": q}]),
                                                         add_special_tokens=False),
                                  SamplingParams(temperature=0.0), max_tokens=16 + 3 * i)
                for i, q in enumerate(QUESTIONS)]

    async def one(request: GenerationRequest) -> str:
        text = ""
        async for deltas in engine.generate(request):
            text += "".join(d.text for d in deltas)
        return text

    async def run() -> list[str]:
        if together:
            return list(await asyncio.gather(*(one(r) for r in requests)))
        return [await one(r) for r in requests]

    return asyncio.run(run())


def _load(folder: Path) -> ServedModel:
    return load_model(ModelConfig(model_id=str(folder)), RuntimeConfig(max_batch_size=8), Path("models"))


def test_right_padded_batches_give_each_request_its_solo_answer(smollm2_fused: Path) -> None:
    model = _load(smollm2_fused)
    try:
        solo = _answers(model, together=False)
        assert _answers(model, together=True) == solo
        assert all(solo) and len(set(solo)) == len(solo)
    finally:
        model.close()


def test_int4_batches_stay_close_to_solo_answers(smollm2_fused_int4: Path) -> None:
    """MatMulNBits' int8-compute kernels take another path at batch 1 than at batch 8, so greedy answers
    may part at near-ties: most answers stay identical, and every one is a full answer."""
    model = _load(smollm2_fused_int4)
    try:
        solo = _answers(model, together=False)
        together = _answers(model, together=True)
    finally:
        model.close()
    assert sum(a == b for a, b in zip(solo, together, strict=True)) >= 5
    assert all(len(b) > 20 for b in together)


def test_fused_graph_refuses_what_the_builder_cannot_do(minilm_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="--graph fused"):
        export(ExportOptions(source=str(minilm_dir), output=tmp_path / "x", graph="fused"))


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "phi3", "gemma"])
def test_every_fused_architecture_is_exact_and_batches_like_solo(name: str) -> None:
    from conftest import tiny_export

    folder = tiny_export(name, graph="fused")  # export validation: 32 greedy tokens equal PyTorch's
    manifest = read_manifest(folder)
    assert manifest.graph == "fused" and _ops(folder)["GroupQueryAttention"] == manifest.num_layers
    model = _load(folder)
    engine = model.generator
    assert engine is not None
    prompts = [[(7 * i + j) % 50 + 5 for j in range(3 + 2 * i)] for i in range(6)]

    async def one(ids: list[int]) -> list[int]:
        tokens: list[int] = []
        request = GenerationRequest(ids, SamplingParams(temperature=0.0), max_tokens=12, ignore_eos=True)
        async for deltas in engine.generate(request):
            tokens += [t for d in deltas for t in d.token_ids]
        return tokens

    async def solo() -> list[list[int]]:
        return [await one(p) for p in prompts]

    async def together() -> list[list[int]]:
        return list(await asyncio.gather(*(one(p) for p in prompts)))

    try:
        assert asyncio.run(together()) == asyncio.run(solo())
    finally:
        model.close()
