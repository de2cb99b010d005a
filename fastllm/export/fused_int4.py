"""int4 for the fused graph, one weight at a time.

The GenAI builder quantizes at the very end: it serializes the whole fp32 graph into one ``ModelProto``
(``ir.to_proto``), hands that to ONNX Runtime's ``MatMulNBitsQuantizer`` and parses the result back. While
that runs, the builder's PyTorch model, the fp32 protobuf and the quantizer's float64 temporaries are all
alive: 3.4× the model's fp32 size at the peak (22 GB for a 1.5B model). Here the builder's layout — blocks
along K, the same initializer and node names its shared-embedding ``GatherBlockQuantized`` refers to — is
written on the builder's in-memory graph weight by weight, in slices of output channels, so only the quantized
weights and one fp32 slice exist besides the PyTorch model. Symmetric, the arithmetic is ONNX Runtime's own and
the graph that comes out is the one ``to_int4`` would have made, bit for bit (tested).

Asymmetric (the CPU int4 default) it is better than the builder's: each block's scale is searched (the
builder's RTN takes max-min over 15, ONNX Runtime's k-quant fits a continuous minimum and then rounds the zero
point) for the least squared error with its integer zero point. Measured on 2,048 tokens of this repo's docs,
int4 exports of GGUF checkpoints: SmolLM2-135M (Q4_1) perplexity 54.0 symmetric, 52.3 RTN asymmetric, 52.6
k-quant, 44.4 searched (fp32: 35.4); Qwen2.5-Coder-0.5B (Q4_K_M) 20.9 symmetric, 20.4 searched (fp32: 18.8).
Zero points cost MatMulNBits nothing measurable.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import numpy as np

# Output channels quantized per slice: the float64 temporaries of a slice stay near 50 MB for K = 8960.
_SLICE_ROWS = 1024
# Asymmetric scales tried per block, as multiples of (max - min) / 15; 1.0 (RTN) among them, so the search is
# never worse than RTN.
_SCALE_FACTORS = np.round(np.linspace(0.7, 1.3, 31), 6).astype(np.float32)


def supported(builder: Any) -> bool:
    """True where the builder asks for RTN int4 in QOperator format (symmetric or not), the layout written here."""
    from onnxruntime.quantization.matmul_nbits_quantizer import RTNWeightOnlyQuantConfig

    attrs = builder.quant_attrs
    config = attrs["int4"]["algo_config"]
    return (isinstance(config, RTNWeightOnlyQuantConfig) and not config.customized_weight_config
            and not attrs["use_qdq"] and builder.quant_type is None)


def quantize_weights(builder: Any) -> Any:
    """``builder.to_int4()``, in place on ``builder.model`` (an ``onnx_ir`` model); returns it."""
    import onnx_ir as ir

    int4 = builder.quant_attrs["int4"]
    block = int(int4["qdq_block_size"])
    accuracy = int(int4["accuracy_level"])
    excluded = set(int4["nodes_to_exclude"])
    symmetric = bool(int4["is_symmetric"])
    graph = builder.model.graph
    for node in list(graph):
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or node.name in excluded:
            continue
        weight = node.inputs[1]
        if weight is None or not weight.is_initializer() or weight.const_value is None or \
                len(weight.const_value.shape) != 2:
            continue
        packed, scales, zero_points = _quantize(weight.const_value.numpy(), block, symmetric=symmetric)
        k, n = weight.const_value.shape
        q_value = _initializer(builder, graph, f"{weight.name}_Q4G{block}", ir.tensor(packed))
        s_value = _initializer(builder, graph, f"{weight.name}_scale", ir.tensor(scales.astype(
            weight.const_value.dtype.numpy())))
        inputs = [node.inputs[0], q_value, s_value]
        if zero_points is not None:  # the name the builder's shared-embedding GatherBlockQuantized reads
            inputs.append(_initializer(builder, graph, f"{weight.name}_zp", ir.tensor(zero_points)))
        attributes = [ir.AttrInt64("K", k), ir.AttrInt64("N", n), ir.AttrInt64("bits", 4),
                      ir.AttrInt64("block_size", block)]
        if accuracy > 0:
            attributes.append(ir.AttrInt64("accuracy_level", accuracy))
        output = node.outputs[0]
        replacement = ir.Node("com.microsoft", "MatMulNBits", inputs, attributes,
                              name=f"{node.name}_Q4")
        result = replacement.outputs[0]
        result.dtype, result.shape = output.dtype, output.shape
        ir.convenience.replace_nodes_and_values(graph, node, [node], [replacement], [output], [result])
        result.name = output.name
        if not weight.uses():
            # The builder's registry of values keeps the old one, and its lazy tensor keeps the fp32 copy it
            # cast on reading: without letting go of both, every weight would end up held in fp32.
            graph.initializers.pop(weight.name, None)
            builder.values.pop(weight.name, None)
            weight.const_value = None
    if builder.model.opset_imports.get("com.microsoft") is None:
        builder.model.opset_imports["com.microsoft"] = 1
    return builder.model


def _initializer(builder: Any, graph: Any, name: str, tensor: Any) -> Any:
    """The graph's value ``name``, holding ``tensor``: the builder may already have made it as a dangling value
    (its shared embedding gathers from the lm_head's quantized weight before that weight exists)."""
    import onnx_ir as ir

    value = builder.values.get(name) or ir.Value(name=name)
    value.const_value = tensor
    value.dtype, value.shape = tensor.dtype, ir.Shape(tensor.shape)
    tensor.name = name
    graph.register_initializer(value)
    return value


def _quantize(weight: np.ndarray, block: int, *, symmetric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """int4 of a (K, N) MatMul weight in MatMulNBits' layout, over slices of output channels: packed uint8
    (N, K/block, block/2), scales (N, K/block), and for asymmetric blocks zero points packed two to a byte, low
    nibble first (N, ceil(K/block / 2)). Zero padding past K is exact either way: it quantizes to the zero point."""
    k, n = weight.shape
    blocks = (k + block - 1) // block
    packed = np.empty((n, blocks, block // 2), dtype=np.uint8)
    scales = np.empty((n, blocks), dtype=np.float64)
    zero_points = None if symmetric else np.full((n, blocks + blocks % 2), 8, dtype=np.uint8)
    for start in range(0, n, _SLICE_ROWS):
        stop = min(n, start + _SLICE_ROWS)
        rows = np.zeros((stop - start, blocks * block), dtype=np.float32)
        rows[:, :k] = weight[:, start:stop].T
        q, scale, zero = _symmetric_blocks(rows.reshape(-1, block)) if symmetric else \
            _searched_blocks(rows.reshape(-1, block))
        packed[start:stop] = (q[:, ::2] | q[:, 1::2] << 4).reshape(stop - start, blocks, block // 2)
        scales[start:stop] = scale.reshape(stop - start, blocks)
        if zero_points is not None:
            zero_points[start:stop, :blocks] = zero.reshape(stop - start, blocks)
    return packed, scales, None if zero_points is None else zero_points[:, ::2] | zero_points[:, 1::2] << 4


def _symmetric_blocks(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray, None]:
    """RTN symmetric, zero point 8: ONNX Runtime's ``quant_tensor`` arithmetic (float64 scales), the builder's."""
    peak = np.maximum(np.abs(groups.min(axis=1, keepdims=True)), np.abs(groups.max(axis=1, keepdims=True)))
    scale = np.ones(peak.shape)
    mask = peak > 0
    scale[mask] = (peak[mask] * 2.0).astype(np.float64) / 15
    return np.clip(np.round(groups / scale + 8), 0, 15).astype(np.uint8), scale, None


def _searched_blocks(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A zero point per block, each block's scale the best of ``_SCALE_FACTORS`` by squared error. A checkpoint
    that was already 4-bit with a minimum per block (GGUF's Q4_1, Q4_K) lies on a grid whose offset no integer
    zero point hits: the search finds the scale that misses it least."""
    low = np.minimum(groups.min(axis=1, keepdims=True), 0)
    span = np.maximum(groups.max(axis=1, keepdims=True), 0) - low
    base = np.where(span > 0, span / 15, 1).astype(np.float32)
    best_error = np.full(base.shape, np.inf, dtype=np.float32)
    best_scale, best_zero = base.copy(), np.zeros_like(base)
    for factor in _SCALE_FACTORS:
        scale = base * factor
        zero = np.clip(np.round(-low / scale), 0, 15)
        q = np.clip(np.round(groups / scale + zero), 0, 15)
        error = np.square((q - zero) * scale - groups).sum(axis=1, keepdims=True)
        better = error < best_error
        best_error = np.where(better, error, best_error)
        best_scale = np.where(better, scale, best_scale)
        best_zero = np.where(better, zero, best_zero)
    q = np.clip(np.round(groups / best_scale + best_zero), 0, 15).astype(np.uint8)
    return q, best_scale, best_zero.astype(np.uint8)


def builder_base() -> ModuleType:
    """The builder's ``base`` module, the one its model classes derive from. The builder imports its classes as
    the top-level package `builders` (its folder put on sys.path), a second copy beside
    `onnxruntime_genai.models.builders`: patches must go to that copy."""
    import onnxruntime_genai.models.builder  # noqa: F401  (puts the builder's folder on sys.path, imports it)

    return sys.modules["builders.base"]


@contextlib.contextmanager
def weight_by_weight() -> Iterator[None]:
    """While the builder runs, its ``to_int4`` quantizes in place where that reproduces its own quantizer."""
    base = builder_base()
    original = base.Model.to_int4

    def to_int4(builder: Any) -> Any:
        return quantize_weights(builder) if supported(builder) else original(builder)

    base.Model.to_int4 = to_int4  # type: ignore[method-assign]
    try:
        yield
    finally:
        base.Model.to_int4 = original  # type: ignore[method-assign]


def dequantize(packed: np.ndarray, scales: np.ndarray, k: int, zero_points: np.ndarray | None = None) -> np.ndarray:
    """The (K, N) float32 weight that packed uint8 (N, K/block, block/2), scales and packed zero points (8 where
    there are none) stand for, low nibbles first (export/prefill_graph.py reads the int4 graph's weights back)."""
    n, blocks, half = packed.shape
    values = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, blocks, 2 * half).astype(np.float32)
    if zero_points is None:
        zero = np.float32(8)
    else:
        zero = np.stack([zero_points & 0x0F, zero_points >> 4], axis=-1).reshape(n, -1)[:, :blocks, None]
    return ((values - zero) * scales.astype(np.float32).reshape(n, blocks, 1)).reshape(n, -1)[:, :k].T
