"""Where a decode step's time goes: ONNX Runtime's profiler over the engine's own step, by operator type.

    python scripts/profile_step.py MODEL_DIR [MODEL_DIR ...] --batch 1,8 --context 256 --steps 64

For each export and batch size: decode steps as the engine runs them (fused graphs: shared KV buffers bound in
place), after a prefill of ``--context`` tokens per row. Prints the wall time per step, the time the profiler
saw inside operators (the rest is ONNX Runtime's framework and our Python: feeds, binding, the mask), each
operator type's share, and the weights read per step over the step's time: the memory bandwidth a step
reaches, to set against what the machine can do.
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

import numpy as np

from fastllm.manifest import Manifest, read_manifest
from fastllm.runtime import providers
from fastllm.runtime.decoder import Decoder
from fastllm.runtime.kv_cache import BatchCache


def profiled_decoder(folder: Path, manifest: Manifest, threads: int, prefix: str) -> Decoder:
    """The engine's own Decoder, its sessions made with ONNX Runtime's profiler on (files under ``prefix``), so
    that what is profiled is what the server runs."""
    base = providers.session_options

    def profiled(threads: int, **kwargs: object):
        options = base(threads, **kwargs)
        options.enable_profiling = True
        options.profile_file_prefix = prefix
        return options

    providers.session_options = profiled  # create_session reads it at call time
    try:
        return Decoder(folder, manifest, threads=threads)
    finally:
        providers.session_options = base


def profile(folder: Path, batch: int, context: int, steps: int, threads: int) -> dict[str, object]:
    decoder = profiled_decoder(folder, read_manifest(folder), threads, f"/tmp/fastllm-profile-{folder.name}-b{batch}")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, 20000, size=context).tolist() for _ in range(batch)]
    out = decoder.prefill(prompts)
    cache = BatchCache(right_padded=decoder.right_padded, shared=decoder.shares_kv)
    cache.join(out.present, [context] * batch)
    tokens = np.argmax(out.logits, axis=-1)[:, None].astype(np.int64)
    positions = np.full((batch, 1), context, dtype=np.int64)
    timings = []
    for _ in range(steps + 8):
        started = time.perf_counter()
        out = decoder.forward(tokens, cache.next_mask(), positions, cache.next_past(), in_place=cache.shared)
        cache.step(out.present)
        tokens = np.argmax(out.logits, axis=-1)[:, None].astype(np.int64)
        timings.append(time.perf_counter() - started)
        positions = positions + 1
    trace = json.loads(Path(decoder.session.end_profiling()).read_text())
    runs = [e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"]
    measured = runs[-steps:]
    start = measured[0]["ts"]
    by_op: collections.Counter[str] = collections.Counter()
    for event in trace:
        if event.get("cat") == "Node" and event.get("ts", 0) >= start and event["name"].endswith("_kernel_time"):
            by_op[event["args"].get("op_name", "?")] += event["dur"]
    step_ms = float(np.median(timings[-steps:]) * 1000)
    run_ms = float(np.median([r["dur"] for r in measured]) / 1000)
    ops_ms = sum(by_op.values()) / steps / 1000
    weights = sum(p.stat().st_size for p in folder.glob("model.onnx*"))
    return {"model": folder.name, "batch": batch, "step_ms": round(step_ms, 2), "session_run_ms": round(run_ms, 2),
            "operators_ms": round(ops_ms, 2), "python_ms": round(step_ms - run_ms, 2),
            "weights_gb_s": round(weights / 1e9 / (step_ms / 1000), 1),
            "share": {op: round(us / steps / 1000 / ops_ms, 3) for op, us in by_op.most_common(8)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = []
    for folder in args.models:
        for batch in (int(b) for b in args.batch.split(",")):
            result = profile(folder, batch, args.context, args.steps, args.threads)
            results.append(result)
            shares = ", ".join(f"{op} {share:.0%}" for op, share in result["share"].items())
            print(f"{result['model']:28s} batch {batch:2d}: step {result['step_ms']:6.2f} ms (session.run "
                  f"{result['session_run_ms']:.2f}, in operators {result['operators_ms']:.2f}, our Python "
                  f"{result['python_ms']:.2f}); weights read at {result['weights_gb_s']} GB/s; {shares}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
