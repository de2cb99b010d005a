"""Post-export graph rewrites: fp16 conversion and ONNX Runtime weight-only quantization.

int4 and int8 both use ``MatMulNBits`` (weights quantized per block, activations untouched), which
keeps quality far better than dynamic int8 ``MatMulInteger`` quantization: that naive int8 changed
SmolLM2-135M's answer to "What is the capital of France?", while weight-only int4 kept "Paris".
``accuracy_level=4`` lets the CPU kernel compute in int8, the fastest path on x86 and ARM.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from fastllm.manifest import LOGITS_TO_KEEP

log = logging.getLogger(__name__)

_TWO_GB = 2**31 - 1


def fold_transposed_initializers(model: object) -> int:
    """Replace ``Transpose(initializer)`` by a transposed initializer.

    optimum exports a tied lm_head as ``MatMul(x, Transpose(embed_tokens))``; the weight-only
    quantizers only touch MatMuls whose weight is a constant, so without this the largest matrix of
    a small model (the vocabulary projection) stays in fp32.
    """
    from onnx import numpy_helper

    graph = model.graph  # type: ignore[attr-defined]
    initializers = {init.name: init for init in graph.initializer}
    folded = 0
    for node in list(graph.node):
        if node.op_type != "Transpose" or node.input[0] not in initializers:
            continue
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        weight = numpy_helper.to_array(initializers[node.input[0]])
        transposed = np.ascontiguousarray(np.transpose(weight, perm))
        graph.initializer.append(numpy_helper.from_array(transposed, name=node.output[0]))
        graph.node.remove(node)
        folded += 1
        if not _still_used(graph, node.input[0]):
            # An untied weight used only through this Transpose: drop the original, not keep both.
            graph.initializer.remove(initializers.pop(node.input[0]))
    return folded


def _still_used(graph: object, name: str) -> bool:
    nodes = graph.node  # type: ignore[attr-defined]
    if any(attr.g.node or attr.graphs for node in nodes for attr in node.attribute):
        return True  # subgraphs (If/Loop) may refer to it; keeping a spare weight is always safe
    return any(name in node.input for node in nodes) or any(o.name == name for o in graph.output)  # type: ignore[attr-defined]


def _import_quantizer() -> tuple[type, type]:
    """Import ORT's quantizer without its side effects on logging.

    The module calls ``logging.basicConfig(level=INFO)`` at import, which would make every library
    user's root logger chatty, and then logs two INFO lines per graph node it visits (thousands).
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    return DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer


def quantize_weights(model: object, bits: int, block_size: int = 32) -> object:
    """Weight-only MatMulNBits quantization (bits 4 or 8), symmetric."""
    DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer = _import_quantizer()

    folded = fold_transposed_initializers(model)
    log.info("quantizing MatMul weights to int%d (MatMulNBits, block %d); %d tied weight(s) folded", bits,
             block_size, folded)
    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, accuracy_level=4, bits=bits)
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True, accuracy_level=4,
                                     algo_config=config)
    quantizer.process()
    return quantizer.model.model


def to_fp16(model: object) -> object:
    """Convert weights and compute to fp16, keeping fp32 inputs and outputs for the runtime."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)


def rewrite(onnx_path: Path, *, dtype: str, quantization: str, block_size: int = 32) -> None:
    """Apply the requested dtype/quantization to ``onnx_path`` in place."""
    import onnx

    if dtype == "fp32" and quantization == "none":
        return
    model = onnx.load(str(onnx_path))
    if quantization in ("int4", "int8"):
        model = quantize_weights(model, bits=4 if quantization == "int4" else 8, block_size=block_size)
    if dtype == "fp16":
        model = to_fp16(model)
    for stale in onnx_path.parent.glob(onnx_path.name + "*"):
        stale.unlink()
    large = model.ByteSize() > _TWO_GB  # type: ignore[attr-defined]
    onnx.save_model(
        model,  # type: ignore[arg-type]
        str(onnx_path),
        save_as_external_data=large,
        all_tensors_to_one_file=True,
        location=onnx_path.name + "_data",
    )


def keep_last_logits(onnx_path: Path, *, right_padded: bool = False) -> None:
    """Compute logits for each row's last ``num_logits_to_keep`` positions only (a new int64 input of shape [1];
    fewer if fewer are new), before the lm_head.

    Generation reads one position per row, and for a 49k vocabulary the prompt's lm_head is a large part of
    the prefill (131 positions × 576 × 49152 multiply-adds for SmolLM2). Speculative decoding verifies drafted
    tokens in one step and reads each of their positions: it feeds their count, every other step feeds 1.
    Left-padded graphs (optimum's) have every row's last token in the last column: a ``Slice``. Right-padded
    graphs (fused) prefill prompts of different lengths in one batch, so each row's last real token comes from
    its attention mask: ``min(sum(mask), new) - 1`` (with an empty past the mask covers just the new tokens;
    with a past, every new token of a row is real).
    The weights are not touched: a graph with external data is rewritten without loading them.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    graph = model.graph
    head = next((n for n in graph.node if "logits" in n.output), None)
    if head is None or any(n.name.startswith("fastllm_last_") for n in graph.node):
        return
    hidden = head.input[0]
    sliced = hidden + "_last_position"
    graph.input.append(helper.make_tensor_value_info(LOGITS_TO_KEEP, onnx.TensorProto.INT64, [1]))

    def const(name: str, values: list[int]) -> str:
        graph.initializer.append(numpy_helper.from_array(np.asarray(values, dtype=np.int64), name=name))
        return name

    t = "fastllm_last_"
    if not right_padded:
        nodes = [
            helper.make_node("Neg", [LOGITS_TO_KEEP], [t + "start"], name=t + "start"),
            helper.make_node("Slice", [hidden, t + "start", const(t + "end", [np.iinfo(np.int64).max]),
                                       const(t + "axis", [1])], [sliced], name=t + "position"),
        ]
    else:
        one, zero, axis1 = const(t + "one", [1]), const(t + "zero", [0]), const(t + "ax1", [1])
        scalar = const(t + "scalar", [])  # an empty shape: Reshape to a scalar, as Range wants
        nodes = [
            helper.make_node("Cast", ["attention_mask"], [t + "mask64"], to=onnx.TensorProto.INT64, name=t + "cast"),
            helper.make_node("ReduceSum", [t + "mask64", axis1], [t + "real"], keepdims=0, name=t + "real"),
            helper.make_node("Shape", ["input_ids"], [t + "new"], start=1, end=2, name=t + "new"),
            helper.make_node("Min", [t + "real", t + "new"], [t + "count"], name=t + "count"),
            helper.make_node("Sub", [t + "count", one], [t + "end"], name=t + "end"),  # [batch]
            helper.make_node("Min", [t + "new", LOGITS_TO_KEEP], [t + "n"], name=t + "n"),  # [1]
            helper.make_node("Reshape", [t + "n", scalar], [t + "n0"], name=t + "n0"),
            helper.make_node("Reshape", [one, scalar], [t + "one0"], name=t + "one0"),
            helper.make_node("Reshape", [zero, scalar], [t + "zero0"], name=t + "zero0"),
            helper.make_node("Range", [t + "zero0", t + "n0", t + "one0"], [t + "steps"], name=t + "steps"),
            helper.make_node("Sub", [t + "steps", t + "n"], [t + "back"], name=t + "back"),  # -n .. -1
            helper.make_node("Unsqueeze", [t + "end", axis1], [t + "end2"], name=t + "end2"),  # [batch, 1]
            helper.make_node("Add", [t + "end2", t + "back"], [t + "raw"], name=t + "raw"),
            helper.make_node("Add", [t + "raw", one], [t + "from"], name=t + "from"),  # end - n + 1 + i
            helper.make_node("Max", [t + "from", zero], [t + "index"], name=t + "index"),
            helper.make_node("Unsqueeze", [t + "index", const(t + "ax2", [2])], [t + "index3"], name=t + "index3"),
            helper.make_node("GatherND", [hidden, t + "index3"], [sliced], batch_dims=1, name=t + "gather"),
        ]
    at = list(graph.node).index(head)
    for offset, node in enumerate(nodes):
        graph.node.insert(at + offset, node)
    head.input[0] = sliced
    for output in graph.output:
        if output.name == "logits":
            output.type.tensor_type.shape.dim[1].dim_param = "logits_positions"
    onnx.save_model(model, str(onnx_path))
