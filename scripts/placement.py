"""Which execution provider runs each node of an exported decoder, read from ONNX Runtime's own profile.

    python scripts/placement.py models/SmolLM2-135M-Instruct-fp16-int4 [--providers CUDAExecutionProvider]

ONNX Runtime places a node on the CPU when the preferred provider has no kernel for its type (CUDA's
GroupQueryAttention has no fp32 one, for instance) and copies tensors across for it, silently at the log
level a server runs at. This runs a prefill and a few decode steps with profiling on and prints, per
provider, the nodes and the time they took, and which operator types fell back to the CPU.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import onnxruntime as ort

from fastllm.manifest import read_manifest
from fastllm.runtime.decoder import Decoder
from fastllm.runtime.generation import greedy_tokens
from fastllm.runtime.providers import choose_providers, session_options


def placement(folder: Path, providers: str | list[str], steps: int) -> dict[str, object]:
    manifest = read_manifest(folder)
    decoder = Decoder(folder, manifest, providers=providers, prefill_graph=False)  # one session to profile
    options = session_options(0)
    options.enable_profiling = True
    options.profile_file_prefix = f"/tmp/placement-{folder.name}"
    chain = choose_providers(providers, ort.get_available_providers())
    # The same graph and options as the decoder's session, with profiling on: ORT cannot start it later.
    decoder.session = decoder.prompt_session = ort.InferenceSession(str(folder / manifest.onnx_file), options,
                                                                     providers=chain)
    tokens = greedy_tokens(decoder, [(7 * i) % 50 + 5 for i in range(32)])
    for _ in range(steps):
        next(tokens)
    tokens.close()
    events = json.loads(Path(decoder.session.end_profiling()).read_text())
    nodes: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    micros: collections.Counter[str] = collections.Counter()
    for event in events:
        args = event.get("args", {})
        if event.get("cat") == "Node" and "provider" in args and event["name"].endswith("_kernel_time"):
            nodes[args["provider"]][args["op_name"]] += 1
            micros[args["provider"]] += event["dur"]
    return {
        "model": folder.name, "dtype": manifest.dtype, "quantization": manifest.quantization,
        "session_providers": decoder.session.get_providers(),
        "kernel_ms": {p: round(us / 1000, 1) for p, us in micros.items()},
        "ops": {p: dict(c.most_common()) for p, c in nodes.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--providers", default="auto")
    parser.add_argument("--steps", type=int, default=8, help="tokens to generate (the first is the prefill's)")
    args = parser.parse_args()
    providers = "auto" if args.providers == "auto" else args.providers.split(",")
    for folder in args.models:
        result = placement(folder, providers, args.steps)
        print(json.dumps(result))
        first = result["session_providers"][0]  # type: ignore[index]
        fallen = {p: ops for p, ops in result["ops"].items() if p != first}  # type: ignore[attr-defined]
        print(f"{folder.name}: nodes not on {first}: {fallen or 'none'}")


if __name__ == "__main__":
    main()
