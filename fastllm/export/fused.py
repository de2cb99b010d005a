"""The fused decoder graph, from ONNX Runtime GenAI's model builder.

optimum's graph is general but made of thousands of small nodes; per decode step that overhead, not
memory bandwidth, bounds speed on CPUs. The GenAI builder writes a graph of fused operators
(``GroupQueryAttention`` with rotary embedding inside, ``SkipSimplifiedLayerNormalization``, packed
QKV ``MatMulNBits``) that plain ``onnxruntime`` runs: we only use the builder at export time, never
its runtime. The graph reads each row's length from the attention mask, so the server right-pads
its batches for it (see ``fastllm.runtime.kv_cache``).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastllm.errors import ExportError, MissingExtraError
from fastllm.export.fused_int4 import builder_base, weight_by_weight

log = logging.getLogger(__name__)

# Architectures the builder supports and we test; others keep optimum's graph.
FUSED_ARCHITECTURES = frozenset({"llama", "mistral", "qwen2", "phi3", "gemma", "gemma3_text", "qwen3", "granite",
                                 "smollm3"})
# int4: int8 compute (accuracy level 4), --block-size weights per scale and zero point (asymmetric: see
# fused_int4; a bool, which create_model takes as is), and the embedding table quantized too and shared with the
# lm_head (GatherBlockQuantized), which keeps an fp32 vocabulary table out of the file.
_INT4_OPTIONS: dict[str, Any] = {"int4_accuracy_level": "4", "int4_op_types_to_quantize": "MatMul/Gather",
                                 "int4_is_symmetric": False, "int4_algo_config": "rtn", "shared_embeddings": "true"}
# int4 for GPUs (--dtype fp16 --quantize int4): fp16 activations, because CUDA's GroupQueryAttention has
# no fp32 kernel (an fp32 graph would run its attention on the CPU, copying the cache every step).
_GPU_INT4_OPTIONS = {"int4_algo_config": "rtn"}
# (dtype, quantize) -> (builder precision, the execution provider the builder targets)
_PRECISION = {
    ("fp32", "none"): ("fp32", "cpu"),
    ("fp32", "int4"): ("int4", "cpu"),
    ("fp16", "none"): ("fp16", "cuda"),
    ("fp16", "int4"): ("int4", "cuda"),
}


def supported(model_type: str, dtype: str, quantization: str) -> bool:
    return model_type in FUSED_ARCHITECTURES and (dtype, quantization) in _PRECISION


def save_checkpoint(model: Any, tokenizer: Any, staging: Path) -> Path:
    """The transformers folder the builder reads: GGUF sources and in-memory fixes (the tokenizer) go through
    one. The caller can then let go of ``model`` while the builder runs: the builder loads the checkpoint again,
    and two copies of the model (ours and the builder's) would set the export's peak memory."""
    checkpoint = staging / ".checkpoint"
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    _expose_original_context(checkpoint / "config.json")
    return checkpoint


def _expose_original_context(config_file: Path) -> None:
    """Llama 3.1+ keep the pre-scaling context inside ``rope_scaling``; the builder (0.12) looks for it as an
    attribute of that dict, never finds it, and rescales the rotary frequencies by the scaled context instead:
    a graph that silently drifts from the model (export validation caught it on a tiny Llama 3.2). Copying it
    to the top level, where the builder looks first and transformers keeps unknown keys, gives it the right one."""
    config = json.loads(config_file.read_text())
    original = (config.get("rope_scaling") or {}).get("original_max_position_embeddings")
    if original and "original_max_position_embeddings" not in config:
        config["original_max_position_embeddings"] = original
        config_file.write_text(json.dumps(config, indent=2))


@contextlib.contextmanager
def _loads_at_saved_dtype() -> Iterator[None]:
    """The builder loads the checkpoint without a dtype, so transformers makes it fp32 whatever was saved:
    a half-precision checkpoint (see `pipeline.working_dtype`) would double in memory. It reads each weight
    and casts it to the graph's dtype itself, so loading at the saved dtype changes nothing else."""
    base = builder_base()
    original = base.AutoModelForCausalLM

    class AtSavedDtype:
        @staticmethod
        def from_pretrained(*args: Any, **kwargs: Any) -> Any:
            return original.from_pretrained(*args, **{"dtype": "auto", **kwargs})

    base.AutoModelForCausalLM = AtSavedDtype
    try:
        yield
    finally:
        base.AutoModelForCausalLM = original


def build(checkpoint: Path, model_type: str, staging: Path, *, dtype: str, quantization: str,
          block_size: int = 32) -> None:
    """Write ``model.onnx`` (+ ``model.onnx.data``) into ``staging`` with the GenAI builder, from ``checkpoint``."""
    try:
        from onnxruntime_genai.models.builder import create_model
    except ImportError as exc:
        raise MissingExtraError("export", exc.name or "onnxruntime_genai") from None
    target = _PRECISION.get((dtype, quantization))
    if target is None:
        raise ExportError(f"--graph fused supports fp32, fp16 and int4, not dtype={dtype} quantize={quantization}")
    precision, provider = target
    built = staging / ".fused"
    try:
        options = {} if precision != "int4" else _INT4_OPTIONS if provider == "cpu" else _GPU_INT4_OPTIONS
        if precision == "int4":
            options = {**options, "int4_block_size": str(block_size)}
        # The builder prints its progress and tqdm bars, and its quantizer and onnx_ir log a line per weight
        # (and warnings about the shared int4 embedding table that validation then checks): the CLI's stdout
        # is the export's path alone, so all of it goes to the debug log instead; errors still surface.
        chatter = io.StringIO()
        logging.disable(logging.WARNING)
        try:
            with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter), weight_by_weight(), \
                    _loads_at_saved_dtype():
                create_model(model_type, str(checkpoint), str(built), precision, provider,
                             str(staging / ".builder-cache"), **options)
        finally:
            logging.disable(logging.NOTSET)
            log.debug("GenAI builder output:\n%s", chatter.getvalue())
        for name in ("model.onnx", "model.onnx.data"):
            if (built / name).is_file():
                shutil.move(built / name, staging / name)
        config = json.loads((built / "genai_config.json").read_text())
        log.info("fused graph built (%s for %s, %s)", precision, provider,
                 config["model"]["decoder"]["session_options"])
    except (ValueError, KeyError, NotImplementedError, AssertionError) as exc:
        raise ExportError(f"the GenAI builder could not build a fused graph: {exc}") from None
    finally:
        for folder in (built, staging / ".builder-cache"):
            shutil.rmtree(folder, ignore_errors=True)
