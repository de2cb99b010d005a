"""Why a long prompt costs more per token than a short one, and how far that is arithmetic: ONNX Runtime's
profiler over a cold prompt read as the engine reads it, by part, with the work each part does.

    python scripts/profile_prompt.py MODEL_DIR [MODEL_DIR ...] --tokens 256,4096

For each fused export and prompt size: one prompt of random token ids read in place through the prompt graph, in
the engine's pieces (``Decoder.prefill_after``). The profiler splits the time into attention
(GroupQueryAttention), the linear layers (the matrix products) and the rest, and each part's rate is its work
over its time: the linear layers' multiply-adds come from the graph's weights (a prompt token goes through every
one, the vocabulary projection only once a run), attention's from the runs' shapes (each new token scored against
every cached one and itself, as ONNX Runtime's CPU kernel computes it, the causal half of a piece included).

Then, for the largest size over the smallest: the ms/token ratio measured; the floor the work alone sets on it
where attention ran at the linear layers' rate ("at equal rates"); and the rate attention would need for the ratio
to be ``--target``, the rest of each read taking what it took, beside this machine's fp32 matrix-product peak.
SmolLM2-135M's linear layers are small next to its attention (106M multiply-adds a token, against 9 heads x 30
layers scoring 2k cached tokens on average at 4k): on a 2-core AMD EPYC its 4k read would meet 1.5x the 256-token
cost per token only with attention at 178 GFLOP/s, above the 153-167 GFLOP/s of the cores' whole fp32 peak,
where ONNX Runtime's kernel reaches 100.
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

import numpy as np
import onnx
from profile_step import profiled_decoder

from fastllm.manifest import read_manifest

LINEAR = ("DynamicQuantizeMatMul", "MatMulNBits", "MatMulInteger", "MatMul", "Gemm")


def graph_work(path: Path) -> tuple[int, int, int]:
    """(query heads, multiply-adds per token of the layers every token goes through, those of the vocabulary
    projection, which a run computes for its last position only)."""
    graph = onnx.load(path, load_external_data=False).graph
    weights = {init.name: list(init.dims) for init in graph.initializer}
    heads, per_token, head = 0, 0, 0
    for node in graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "GroupQueryAttention":
            heads = int(attrs["num_heads"])
        elif node.op_type == "MatMulNBits":
            macs = int(attrs["K"]) * int(attrs["N"])
            if "lm_head" in node.name:
                head += macs
            else:
                per_token += macs
        elif node.op_type in LINEAR and node.input[1] in weights and len(weights[node.input[1]]) == 2:
            rows, cols = weights[node.input[1]]
            if "lm_head" in node.name:
                head += rows * cols
            else:
                per_token += rows * cols
    if not heads:
        raise SystemExit(f"{path}: no GroupQueryAttention; this profile is for fused exports")
    return heads, per_token, head


def profile(folder: Path, tokens: int, threads: int) -> dict[str, object]:
    manifest = read_manifest(folder)
    decoder = profiled_decoder(folder, manifest, threads, f"/tmp/fastllm-prompt-{folder.name}-{tokens}")
    graph = folder / (manifest.prefill_file if decoder.has_prefill_graph else manifest.onnx_file)
    heads, per_token, head = graph_work(graph)
    runs: list[tuple[int, int]] = []  # (new tokens, tokens attended to) of each run
    forward = decoder.forward

    def counted(input_ids: np.ndarray, attention_mask: np.ndarray, *args: object, **kwargs: object):
        runs.append((input_ids.shape[1], attention_mask.shape[1]))
        return forward(input_ids, attention_mask, *args, **kwargs)

    decoder.forward = counted  # type: ignore[method-assign]
    prompt = np.random.default_rng(tokens).integers(100, 20000, size=tokens).tolist()
    started = time.perf_counter()
    decoder.prefill_after(prompt, 0, decoder.kv_buffers(tokens), in_place=decoder.shares_kv)
    seconds = time.perf_counter() - started
    trace = json.loads(Path(decoder.prompt_session.end_profiling()).read_text())
    by_op: collections.Counter[str] = collections.Counter()
    for event in trace:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            by_op[event["args"].get("op_name", "?")] += event["dur"]
    attention_s = by_op.pop("GroupQueryAttention", 0) / 1e6
    linear_s = sum(by_op.pop(op, 0) for op in LINEAR) / 1e6
    other_s = sum(by_op.values()) / 1e6
    layers = manifest.num_layers or len(decoder.past_names) // 2
    attention_flops = sum(4 * heads * decoder.head_dim * new * span * layers for new, span in runs)
    linear_ops = 2 * (per_token * tokens + head * len(runs))
    return {"model": folder.name, "tokens": tokens, "runs": len(runs), "seconds": round(seconds, 3),
            "ms_per_token": round(seconds * 1000 / tokens, 3), "attention_s": round(attention_s, 3),
            "linear_s": round(linear_s, 3), "other_s": round(other_s, 3),
            "attention_gflop": round(attention_flops / 1e9, 1), "linear_gop": round(linear_ops / 1e9, 1),
            "attention_gflop_s": round(attention_flops / 1e9 / attention_s, 1) if attention_s else None,
            "linear_gop_s": round(linear_ops / 1e9 / linear_s, 1) if linear_s else None}


def fp32_peak() -> float:
    """GFLOP/s of a large fp32 matrix product (numpy's BLAS on every core): what attention's fp32 products cannot
    beat on this machine."""
    a = np.random.default_rng(0).standard_normal((2048, 2048), dtype=np.float32)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - started)
    return 2 * 2048**3 / best / 1e9


def needed(short: dict, long: dict, target: float) -> str:
    """The attention rate at which the measured ratio would be ``target``, the rest of each read as measured:
    per token, (rest_long + attention_long / rate) = target * (rest_short + attention_short / rate)."""
    rest = [(row["seconds"] - row["attention_s"]) / row["tokens"] for row in (short, long)]
    work = [row["attention_gflop"] / row["tokens"] for row in (short, long)]
    if rest[1] >= target * rest[0]:
        return f"{target}x is out of reach even with attention free"
    if work[1] <= target * work[0]:
        return f"{target}x holds at any attention rate: the rest of the read alone stays under it"
    rate = (work[1] - target * work[0]) / (target * rest[0] - rest[1])
    return (f"{target}x needs attention at {rate:.1f} GFLOP/s ({rate / long['linear_gop_s']:.2f}x the linear "
            f"layers' rate; measured {long['attention_gflop_s']})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--tokens", default="256,4096", help="prompt sizes, smallest first")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--target", type=float, default=1.5, help="the ms/token ratio to ask attention's rate for")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = []
    print(f"fp32 matrix products here: {fp32_peak():.0f} GFLOP/s (numpy, 2048 x 2048)")
    for folder in args.models:
        rows = [profile(folder, int(n), args.threads) for n in args.tokens.split(",")]
        results.extend(rows)
        for row in rows:
            print(f"{row['model']:36s} {row['tokens']:6d} tokens in {row['runs']:3d} runs: {row['seconds']:7.2f} s "
                  f"({row['ms_per_token']:.2f} ms/token); attention {row['attention_s']:.2f} s "
                  f"({row['attention_gflop']} GFLOP at {row['attention_gflop_s']} GFLOP/s), linear layers "
                  f"{row['linear_s']:.2f} s ({row['linear_gop']} GOP at {row['linear_gop_s']} GOP/s), "
                  f"the rest {row['other_s']:.2f} s")
        short, long = rows[0], rows[-1]
        work = [(row["attention_gflop"] + row["linear_gop"]) / row["tokens"] for row in (short, long)]
        print(f"{folder.name:36s} ms/token at {long['tokens']} / at {short['tokens']}: measured "
              f"{long['ms_per_token'] / short['ms_per_token']:.2f}x; at equal rates, the floor "
              f"{work[1] / work[0]:.2f}x; {needed(short, long, args.target)}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
