"""A second graph for prompts, beside the int4 decode graph: int8 weights, int8 activations (W8A8).

A decode step multiplies one row per sequence by each weight: it reads the weights once and int4 halves what it
reads. A prompt multiplies hundreds of rows by them, and there the kernel's arithmetic is what counts: ONNX
Runtime's integer GEMM (``DynamicQuantizeMatMul``, MLAS's u8 x s8 kernels with VNNI) does about 750 GMAC/s on two
AVX-512 cores where ``MatMulNBits`` does 250 at any bit width, so a prompt reads in half the time (2k tokens of
Qwen2.5-0.5B: 4.4 s -> 2.4 s). The decode graph keeps int4: at one row per sequence int8 weights would be read
twice as slowly.

``DynamicQuantizeMatMul`` quantizes its whole input with one scale; LLM activations vary by orders of magnitude
between tokens and between channels, and that alone cost SmolLM2 5% perplexity. So, per weight input:
  - channels are smoothed as SmoothQuant does: activations divided and weight rows multiplied by
    ``max|x_k|^a / max|w_k|^(1-a)`` (activation maxima from a fixed calibration text run through the int4 graph);
  - each token's row is divided by its own largest value and the product multiplied back by it (per-token scales);
  - two constant columns, -1 and +1, against two zero weight rows, pin the input's range to [-1, 1], so that the
    quantization of a row never depends on the other rows in the step: a prompt gives the same keys and values
    read whole, in chunks, or after a cached prefix (the prefix cache's token-exact reuse rests on it).
The int8 weights come from the int4 graph's own (dequantized, then per output channel), so the graph needs nothing
but ``model.onnx`` and the tokenizer (for the calibration text); requantizing cost nothing measurable (perplexity
18.80 -> 18.82, Qwen2.5-Coder-0.5B).

A short prompt's time goes to the graph's many small nodes as much as to its GEMMs, so the smoothing is folded where
it is exact: into the norm weights before q/k/v and gate/up, and into the up projection's columns before the down
projection (``silu(gate) * up``); only the attention output keeps a ``Mul``, as its values are also the KV cache's.
The range columns are made once per graph, not per input: 1,710 nodes become 1,143 for SmolLM2, whose prompts then
read faster on 2 cores (20 tokens 17.8 -> 15.6 ms, 40 tokens 28.3 -> 25.7 ms, 1k tokens 543 -> 520 ms).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from fastllm.export.fused_int4 import dequantize

log = logging.getLogger(__name__)

PREFILL_ONNX = "prefill.onnx"
# SmoothQuant's migration strength. Perplexity on 2k tokens against the int4 graph's: SmolLM2 +1.2% at 0.5, +0.5% at
# 0.7; Qwen2.5-Coder-0.5B +0.5% at 0.5, +0.8% at 0.7. 0.6 sits between.
SMOOTHING = 0.6
# Exports whose int8 copy of the weights would pass this keep int4 for prompts unless asked (--prefill-graph int8):
# the prompt graph costs its weights in memory again, which a 7B model on a laptop cannot spare.
AUTO_LIMIT_BYTES = 4 * 2**30
# Text for the activation maxima: prose, code and JSON, unlike validate.QUALITY_TEXT that measures the result.
CALIBRATION_TEXT = """\
The committee met on Tuesday to review the budget for the coming year. After a long discussion about the cost of
repairs to the old bridge, the members agreed to postpone the new library until the spring. Several residents asked
why the bus service had been cut, and the chair promised a written answer within two weeks.

def merge_intervals(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    \"\"\"Merge overlapping closed intervals.\"\"\"
    merged: list[tuple[int, int]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged

{"id": "order-1842", "items": [{"sku": "A-17", "qty": 3, "price": 12.5}, {"sku": "B-04", "qty": 1, "price": 99.0}],
 "shipping": {"method": "express", "address": {"city": "Lyon", "zip": "69002"}}, "paid": true}

Photosynthesis converts light energy into chemical energy: chlorophyll absorbs mostly blue and red light, water is
split to release oxygen, and carbon dioxide is fixed into sugars in the Calvin cycle. In 1905 Einstein explained the
photoelectric effect; in 1953 the structure of DNA was published. 42 + 17 = 59, and 3.14159 * 2 = 6.28318.
User: Can you summarise the main points of the report in three bullet points?
Assistant: Sure. 1. Revenue grew by 12% year over year. 2. Costs rose faster in logistics. 3. The outlook is stable.
"""


def wanted(mode: str, model_path: Path) -> bool:
    """``--prefill-graph``: "int8", "none", or "auto" (int8 while its weights stay under AUTO_LIMIT_BYTES)."""
    if mode != "auto":
        return mode == "int8"
    int4_bytes = sum(p.stat().st_size for p in model_path.parent.glob(model_path.name + "*"))
    if 2 * int4_bytes > AUTO_LIMIT_BYTES:
        log.info("no int8 prompt graph: it would hold about %.1f GB more in memory (--prefill-graph int8 builds it)",
                 2 * int4_bytes / 1e9)
        return False
    return True


def build(model_path: Path, tokenizer_file: Path, context_length: int) -> Path | None:
    """Write ``prefill.onnx`` (+ ``.data``) beside ``model_path``, a fused fp32-activation int4 graph; None where
    the graph has no int4 weights this can convert."""
    import onnx

    folder = model_path.parent
    graph_only = onnx.load(str(model_path), load_external_data=False)
    initializers = {t.name for t in graph_only.graph.initializer}
    targets = [n.name for n in graph_only.graph.node if _convertible(n, initializers)]
    names = [n.name for n in graph_only.graph.node]
    if not targets or "" in targets or len(set(names)) != len(names):  # the rewrite finds nodes by name
        return None
    maxima = _calibrate(graph_only, folder, tokenizer_file, targets, context_length)
    model = onnx.load(str(model_path))
    _rewrite(model, set(targets), maxima)
    out = folder / PREFILL_ONNX
    onnx.save(model, str(out), save_as_external_data=True, location=PREFILL_ONNX + ".data",
              all_tensors_to_one_file=True)
    log.info("int8 prompt graph: %d weights converted (SmoothQuant %.1f, per-token activation scales)", len(targets),
             SMOOTHING)
    return out


def _convertible(node: Any, initializers: set[str]) -> bool:
    """4-bit, weights (and zero points, where there are) held in the file, not the lm_head (a prompt needs one
    row of logits: int4 is fine there)."""
    from onnx import helper

    if node.op_type != "MatMulNBits" or node.domain != "com.microsoft" or "logits" in node.output or \
            not set(node.input[1:3]) <= initializers:
        return False
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    zero_points_held = len(node.input) < 4 or not node.input[3] or node.input[3] in initializers
    return attrs.get("bits") == 4 and zero_points_held and len(node.input) < 5


def _calibrate(graph_only: Any, folder: Path, tokenizer_file: Path, targets: list[str],
               context_length: int) -> dict[str, np.ndarray]:
    """Each converted weight's input: its largest magnitude per channel over CALIBRATION_TEXT."""
    import onnx
    import onnxruntime as ort
    from tokenizers import Tokenizer

    nodes = {n.name: n for n in graph_only.graph.node}
    inputs = sorted({nodes[name].input[0] for name in targets})
    probe = onnx.ModelProto()
    probe.CopyFrom(graph_only)
    for name in inputs:
        probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    probe_path = folder / ".calibration.onnx"  # beside model.onnx.data, which it reads
    onnx.save(probe, str(probe_path))
    try:
        session = ort.InferenceSession(str(probe_path), providers=["CPUExecutionProvider"])
        ids = Tokenizer.from_file(str(tokenizer_file)).encode(CALIBRATION_TEXT).ids[:context_length]
        feeds: dict[str, np.ndarray] = {"input_ids": np.asarray([ids], dtype=np.int64),
                                        "attention_mask": np.ones((1, len(ids)), dtype=np.int64)}
        for spec in session.get_inputs():
            if spec.name.startswith("past_key_values."):
                feeds[spec.name] = np.zeros((1, spec.shape[1], 0, spec.shape[3]), dtype=np.float32)
            elif spec.name == "num_logits_to_keep":
                feeds[spec.name] = np.ones(1, dtype=np.int64)
        found = session.run(inputs, feeds)
        del session
    finally:
        probe_path.unlink(missing_ok=True)
    return {name: np.abs(value.reshape(-1, value.shape[-1])).max(axis=0) for name, value in zip(inputs, found,
                                                                                                strict=True)}


def _dequantized(node: Any, tensors: dict[str, Any]) -> np.ndarray:
    """A MatMulNBits weight as the (K, N) float32 matrix it stands for."""
    from onnx import helper, numpy_helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    k, n, block = attrs["K"], attrs["N"], attrs["block_size"]
    packed = numpy_helper.to_array(tensors[node.input[1]]).reshape(n, (k + block - 1) // block, block // 2)
    zero_points = numpy_helper.to_array(tensors[node.input[3]]) if len(node.input) > 3 and node.input[3] else None
    return dequantize(packed, numpy_helper.to_array(tensors[node.input[2]]), k, zero_points)


def _rewrite(model: Any, targets: set[str], maxima: dict[str, np.ndarray]) -> None:
    from onnx import helper, numpy_helper

    graph = model.graph
    tensors = {t.name: t for t in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    # One smoothing per input, shared by the weights that read it (q/k/v, gate and up): their largest row
    # magnitudes. Weights are dequantized one at a time, here and again below, so that a 3B model's fp32 copy
    # never exists whole (as export/fused_int4.py quantizes them).
    peaks: dict[str, np.ndarray] = {}
    for name in targets:
        source = nodes[name].input[0]
        peaks[source] = np.maximum(peaks.get(source, 0), np.abs(_dequantized(nodes[name], tensors)).max(axis=1))
    smoothing = {source: np.clip(np.power(np.maximum(maxima[source], 1e-5), SMOOTHING)
                                 / np.power(np.maximum(peak, 1e-5), 1 - SMOOTHING), 1e-3, 1e3).astype(np.float32)
                 for source, peak in peaks.items()}
    folded_into_norm, folded_into_columns = _foldable(graph, targets, set(smoothing), tensors)
    folded = set(folded_into_norm) | set(folded_into_columns.values())
    for source, gamma in folded_into_norm.items():
        tensors[gamma].CopyFrom(numpy_helper.from_array(
            (numpy_helper.to_array(tensors[gamma]) / smoothing[source]).astype(np.float32), gamma))
    added = [numpy_helper.from_array(np.array([-1], dtype=np.int64), "w8a8_last_axis"),
             numpy_helper.from_array(np.array([2], dtype=np.int64), "w8a8_two"),
             numpy_helper.from_array(np.array(1e-12, dtype=np.float32), "w8a8_tiny"),
             numpy_helper.from_array(np.array([-1.0, 1.0], dtype=np.float32), "w8a8_range")]
    # The -1 and +1 columns, [batch, tokens, 2], once for every input of the graph.
    rewritten = [
        helper.make_node("Shape", ["input_ids"], ["w8a8/tokens_shape"], name="w8a8/tokens_shape"),
        helper.make_node("Concat", ["w8a8/tokens_shape", "w8a8_two"], ["w8a8/range_shape"], axis=0,
                         name="w8a8/range_shape"),
        helper.make_node("Expand", ["w8a8_range", "w8a8/range_shape"], ["w8a8/range"], name="w8a8/range"),
    ]
    prepared: dict[str, tuple[str, str]] = {}  # input -> (its scaled rows with the range columns, row scales)
    for node in graph.node:
        if node.name not in targets:
            rewritten.append(node)
            continue
        source = node.input[0]
        if source not in prepared:
            rewritten.extend(_row_quantizable(source, None if source in folded else smoothing[source], added))
            prepared[source] = (f"{source}/w8a8/ranged", f"{source}/w8a8/row_peak")
        ranged, row_peak = prepared[source]
        weight = _dequantized(node, tensors) * smoothing[source][:, None]
        if node.name in folded_into_columns:  # the next weight's smoothing, carried by this one's output
            weight /= smoothing[folded_into_columns[node.name]][None, :]
        column_scale = np.abs(weight).max(axis=0) / 127
        column_scale[column_scale == 0] = 1
        quantized = np.zeros((weight.shape[0] + 2, weight.shape[1]), dtype=np.int8)  # + the range columns' rows
        quantized[:-2] = np.clip(np.round(weight / column_scale), -127, 127)
        added += [numpy_helper.from_array(quantized, f"{node.name}/w8a8/weight"),
                  numpy_helper.from_array(column_scale.astype(np.float32), f"{node.name}/w8a8/scale")]
        product = f"{node.output[0]}/w8a8/unscaled"
        rewritten += [
            helper.make_node("DynamicQuantizeMatMul", [ranged, f"{node.name}/w8a8/weight", f"{node.name}/w8a8/scale"],
                             [product], name=f"{node.name}/w8a8", domain="com.microsoft"),
            helper.make_node("Mul", [product, row_peak], [node.output[0]], name=f"{node.name}/w8a8/rescale"),
        ]
    del graph.node[:]
    graph.node.extend(rewritten)
    used = {name for node in rewritten for name in node.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept + [t for t in added if t.name in used])


def _foldable(graph: Any, targets: set[str], sources: set[str],
              tensors: dict[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """Inputs whose smoothing can be folded into what makes them, exactly: ``{input: norm weight}`` for a
    (Skip)SimplifiedLayerNormalization's output, and ``{weight node: input}`` for ``a * b`` where ``b`` is a
    converted weight's output (the MLP's up projection). Only inputs that converted weights alone read, made by
    nodes (and norm weights) nothing else reads."""
    producers = {out: node for node in graph.node for out in node.output}
    readers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    into_norm: dict[str, str] = {}
    into_columns: dict[str, str] = {}
    for source in sources:
        maker = producers.get(source)
        if maker is None or any(reader.name not in targets for reader in readers[source]):
            continue
        if maker.op_type in ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization") and \
                maker.output[0] == source:
            gamma = maker.input[2 if maker.op_type.startswith("Skip") else 1]
            if gamma in tensors and len(readers[gamma]) == 1:
                into_norm[source] = gamma
        elif maker.op_type == "Mul":
            weights = [producers.get(name) for name in maker.input]
            carrier = next((w for w in reversed(weights) if w is not None and w.name in targets and
                            len(readers[w.output[0]]) == 1), None)
            if carrier is not None:
                into_columns[carrier.name] = source
    return into_norm, into_columns


def _row_quantizable(source: str, smoothing: np.ndarray | None, added: list[Any]) -> list[Any]:
    """Nodes that turn ``source`` into rows whose largest magnitude is 1, smoothed (``smoothing`` None: folded into
    what makes it), followed by the -1 and +1 columns."""
    from onnx import helper, numpy_helper

    p = f"{source}/w8a8"
    nodes = []
    smoothed = source
    if smoothing is not None:
        added.append(numpy_helper.from_array((1 / smoothing).astype(np.float32), f"{p}/inverse_smoothing"))
        nodes.append(helper.make_node("Mul", [source, f"{p}/inverse_smoothing"], [f"{p}/smoothed"], name=f"{p}/smooth"))
        smoothed = f"{p}/smoothed"
    return [
        *nodes,
        helper.make_node("Abs", [smoothed], [f"{p}/magnitude"], name=f"{p}/abs"),
        helper.make_node("ReduceMax", [f"{p}/magnitude", "w8a8_last_axis"], [f"{p}/row_max"], keepdims=1,
                         name=f"{p}/row_max"),
        helper.make_node("Max", [f"{p}/row_max", "w8a8_tiny"], [f"{p}/row_peak"], name=f"{p}/row_peak"),
        helper.make_node("Div", [smoothed, f"{p}/row_peak"], [f"{p}/unit"], name=f"{p}/unit"),
        helper.make_node("Concat", [f"{p}/unit", "w8a8/range"], [f"{p}/ranged"], axis=-1, name=f"{p}/ranged"),
    ]
