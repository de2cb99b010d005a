"""The fused decoder graph, from ONNX Runtime GenAI's model builder.

optimum's graph is general but made of thousands of small nodes; per decode step that overhead, not
memory bandwidth, bounds speed on CPUs. The GenAI builder writes a graph of fused operators
(``GroupQueryAttention`` with rotary embedding inside, ``SkipSimplifiedLayerNormalization``, packed
QKV ``MatMulNBits``) that plain ``onnxruntime`` runs: we only use the builder at export time, never
its runtime. The graph reads each row's length from the attention mask, so the server right-pads
its batches for it (see ``fastllm.runtime.kv_cache``).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from fastllm.errors import ExportError, MissingExtraError

log = logging.getLogger(__name__)

# Architectures the builder supports and we test; others keep optimum's graph.
FUSED_ARCHITECTURES = frozenset({"llama", "mistral", "qwen2", "phi3", "gemma"})
# int4: int8 compute (accuracy level 4), blocks of 32, and the embedding table quantized too and shared
# with the lm_head (GatherBlockQuantized), which keeps an fp32 vocabulary table out of the file.
_INT4_OPTIONS = {"int4_accuracy_level": "4", "int4_block_size": "32", "int4_op_types_to_quantize": "MatMul/Gather",
                 "int4_algo_config": "rtn", "shared_embeddings": "true"}
_PRECISION = {("fp32", "none"): "fp32", ("fp32", "int4"): "int4", ("fp16", "none"): "fp16"}


def supported(model_type: str, dtype: str, quantization: str) -> bool:
    return model_type in FUSED_ARCHITECTURES and (dtype, quantization) in _PRECISION


def build(model: Any, tokenizer: Any, staging: Path, *, dtype: str, quantization: str) -> None:
    """Write ``model.onnx`` (+ ``model.onnx.data``) into ``staging`` with the GenAI builder."""
    try:
        from onnxruntime_genai.models.builder import create_model
    except ImportError as exc:
        raise MissingExtraError("export", exc.name or "onnxruntime_genai") from None
    precision = _PRECISION.get((dtype, quantization))
    if precision is None:
        raise ExportError(f"--graph fused supports fp32, fp16 and int4, not dtype={dtype} quantize={quantization}")
    checkpoint = staging / ".checkpoint"
    built = staging / ".fused"
    try:
        # The builder reads a transformers folder; GGUF and in-memory fixes (tokenizer) go through one.
        model.save_pretrained(checkpoint)
        tokenizer.save_pretrained(checkpoint)
        options = _INT4_OPTIONS if precision == "int4" else {}
        create_model(model.config.model_type, str(checkpoint), str(built), precision,
                     "cuda" if precision == "fp16" else "cpu", str(staging / ".builder-cache"), **options)
        for name in ("model.onnx", "model.onnx.data"):
            if (built / name).is_file():
                shutil.move(built / name, staging / name)
        config = json.loads((built / "genai_config.json").read_text())
        log.info("fused graph built (%s, %s)", precision, config["model"]["decoder"]["session_options"])
    except (ValueError, KeyError, NotImplementedError, AssertionError) as exc:
        raise ExportError(f"the GenAI builder could not build a fused graph: {exc}") from None
    finally:
        for folder in (checkpoint, built, staging / ".builder-cache"):
            shutil.rmtree(folder, ignore_errors=True)
