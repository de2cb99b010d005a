"""How much memory an export needs, judged before any weights load.

An export that does not fit should fail in a second with the numbers, not after minutes by the kernel's
OOM killer (which leaves no message at all). The estimate is the model's size at the precision the export
holds it (see `pipeline.working_dtype`) times a factor measured with ``scripts/export_memory.py``, plus
the libraries.
"""

from __future__ import annotations

import contextlib
import json
import resource
import struct
import sys
from pathlib import Path
from typing import Any

from fastllm.errors import ExportError
from fastllm.runtime.providers import CGROUP_MEMORY_MAX, cgroup_memory_limit

# torch, transformers, onnxruntime and the builder, resident before the first weight is read.
LIBRARIES = 0.6e9
# Peak over the checkpoint's bytes at the working dtype, measured with scripts/export_memory.py
# (docs/export-memory.md): fp16 (the fused graph at int4 or fp16) 1.6-1.8×, fp32 (optimum's graph, traced
# from the model, and fused fp32) 2.0-2.3×. Checkpoint bytes count a tied vocabulary table twice where the
# file stores it twice (GGUF's output.weight), which the model does not.
FACTOR = {"fp16": 1.6, "fp32": 2.2}
_BYTES = {"F64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1,
          "F8_E5M2": 1, "I64": 8}


def parameter_count(folder: Path, gguf_file: str | None, config: dict[str, Any]) -> int | None:
    """The checkpoint's number of weights, from file headers alone; None where they do not tell."""
    if gguf_file:
        from fastllm.export.sources import gguf_parameter_count

        return gguf_parameter_count(folder / gguf_file)
    safetensors = sorted(folder.glob("*.safetensors"))
    if safetensors:
        return sum(_safetensors_elements(path) for path in safetensors)
    pickles = sorted(folder.glob("pytorch_model*.bin"))
    if pickles:
        stored = str(config.get("torch_dtype") or config.get("dtype") or "float32")
        return sum(p.stat().st_size for p in pickles) // (2 if stored in ("float16", "bfloat16") else 4)
    return None


def _safetensors_elements(path: Path) -> int:
    with path.open("rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(length))
    total = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        start, end = entry["data_offsets"]
        total += (end - start) // _BYTES.get(entry["dtype"], 4)
    return total


def estimate(parameters: int, working_dtype: str) -> float:
    """Bytes of memory the export is expected to peak at."""
    return LIBRARIES + FACTOR[working_dtype] * parameters * (2 if working_dtype == "fp16" else 4)


def available() -> float | None:
    """Bytes this process can still take: the system's available memory, or the cgroup's limit if lower."""
    free: float | None = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except OSError:
        try:
            import psutil
        except ImportError:
            return None
        free = float(psutil.virtual_memory().available)
    limit = cgroup_memory_limit()
    if limit is not None and free is not None:
        with contextlib.suppress(OSError, ValueError):  # no usage to read: what the machine has stands
            free = min(free, limit - int(CGROUP_MEMORY_MAX.with_name("memory.current").read_text()))
    return free


def check_fits(parameters: int | None, working_dtype: str, limit_gb: float | None) -> None:
    """Refuse an export expected to need more than ``limit_gb`` (default: what is available now)."""
    if parameters is None:
        return
    need = estimate(parameters, working_dtype)
    limit = limit_gb * 1e9 if limit_gb is not None else available()
    if limit is None or need <= limit:
        return
    source = "--max-memory" if limit_gb is not None else "available on this machine now"
    raise ExportError(
        f"this export needs about {need / 1e9:.1f} GB of memory ({parameters / 1e9:.2f}B weights held at "
        f"{working_dtype}), and {limit / 1e9:.1f} GB is {source}. Free memory, or export on a larger machine; "
        "--quantize int4 with the fused graph (the default graph where the architecture allows) holds the "
        "model at fp16, half of what the fp32 exports need"
    )


def peak_rss() -> float:
    """This process's peak resident memory so far, in bytes: what `/usr/bin/time -v` reports. Linux's VmHWM,
    not ``ru_maxrss``, which a child inherits from the process that forked it (a CLI run from a large
    parent would report the parent's peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(int(line.split()[1]) * 1024)
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(peak if sys.platform == "darwin" else peak * 1024)
