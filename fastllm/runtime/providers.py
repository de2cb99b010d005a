"""Execution-provider choice and session creation, with a loud fallback.

The choice is a pure function of what onnxruntime reports as available, so it is tested without a
GPU; creating the session is where a provider can still fail (missing CUDA libraries, a CoreML
model it cannot compile), and there we fall back to the next provider and say so in the log.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastllm.errors import ConfigError, ModelLoadError

log = logging.getLogger(__name__)

# Order of preference for "auto": accelerators first, the CPU always last as the safety net.
PREFERENCE = (
    "CUDAExecutionProvider",
    "ROCMExecutionProvider",
    "CoreMLExecutionProvider",
    "DmlExecutionProvider",
    "CPUExecutionProvider",
)
CPU = "CPUExecutionProvider"


def choose_providers(requested: str | Sequence[str], available: Sequence[str]) -> list[str]:
    """Ordered providers to try: "auto" ranks the available ones, a list is validated as given.

    A bare string other than "auto" is read as a comma-separated list, so that
    ``"CUDAExecutionProvider"`` is one provider rather than a sequence of characters.
    """
    if isinstance(requested, str):
        if requested.strip().lower() == "auto":
            chosen = [p for p in PREFERENCE if p in available]
            return chosen or [CPU]
        requested = requested.split(",")
    chosen = list(dict.fromkeys(p.strip() for p in requested if p.strip()))
    unknown = [p for p in chosen if p not in available]
    if unknown:
        hint = ""
        if "CUDAExecutionProvider" in unknown:
            hint = (' (CUDA needs onnxruntime-gpu in place of onnxruntime: pip uninstall -y onnxruntime && '
                    'pip install "fastllm[gpu]")')
        raise ConfigError(
            f"runtime.providers asks for {unknown}, but this onnxruntime build offers {list(available)}{hint}"
        )
    if CPU not in chosen:
        chosen.append(CPU)
    return chosen


def physical_cores() -> int:
    """Physical cores: ORT runs best with one intra-op thread per core, not per hyper-thread."""
    try:
        seen = set()
        physical = core = None
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("physical id"):
                    physical = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":")[1].strip()
                    seen.add((physical, core))
        allowed = len(os.sched_getaffinity(0))
        if seen:
            return max(1, min(len(seen), allowed))
        return max(1, allowed)
    except (OSError, AttributeError):
        return max(1, os.cpu_count() or 1)


CGROUP_MEMORY_MAX = Path("/sys/fs/cgroup/memory.max")


def cgroup_memory_limit(cgroup: Path = CGROUP_MEMORY_MAX) -> int | None:
    """This process's container memory limit (cgroup v2) in bytes, as a Kubernetes pod or `docker run --memory`
    sets it; None where there is none ("max") or no cgroup v2 to ask."""
    try:
        limit = cgroup.read_text().strip()
    except OSError:
        return None
    return int(limit) if limit.isdigit() else None


def memory_bytes(cgroup: Path = CGROUP_MEMORY_MAX) -> int:
    """The memory this process may use: the machine's, or its container's limit where lower, where the machine's
    would overstate it."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = cgroup_memory_limit(cgroup)
    return total if limit is None else min(total, limit)


@dataclass
class LoadedSession:
    session: Any
    provider: str


def session_options(threads: int, *, spinning: bool = True, spin_after_run: bool = True) -> Any:
    """``spinning``: whether idle intra-op threads spin waiting for work (ONNX Runtime's default, which saves
    the wake-up between a step's many small operators). Two sessions that take turns on the same cores, a
    draft model's and its target's, must not: each one's spinning threads take the cores the other runs on.
    ``spin_after_run=False`` keeps the spinning inside a run but stops it when the run returns: for a model's
    two graphs (prompts and decode steps), which never run at once."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not spin_after_run:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or physical_cores()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.enable_mem_pattern = False  # shapes change every step; patterns would be rebuilt each run
    options.log_severity_level = 3
    return options


def _option_values(options: dict[str, Any]) -> dict[str, Any]:
    """ORT stringifies option values; a TOML ``4e9`` would reach it as "4000000000.0", which integer
    options such as ``gpu_mem_limit`` do not parse, so whole floats go over as integers."""
    return {key: int(value) if isinstance(value, float) and value.is_integer() else value
            for key, value in options.items()}


@functools.cache
def load_cuda_libraries() -> None:
    """Load the CUDA and cuDNN libraries that ``onnxruntime-gpu[cuda,cudnn]`` installs as pip packages.

    The dynamic loader does not search site-packages, so without this the CUDA provider finds them only
    where a system CUDA of the same major is on the library path. ``preload_dlls`` (onnxruntime 1.21+)
    loads them by path and falls back to the loader's own search; it prints what it misses, which goes
    to our log instead of stdout. Once per process: loading twice is harmless but slow.
    """
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            preload()
    except Exception as exc:  # a broken CUDA install must not stop a CPU fallback
        log.warning("loading CUDA libraries failed: %s", exc)
    if printed.getvalue().strip():
        log.warning("loading CUDA libraries: %s", " ".join(printed.getvalue().split()))


def create_session(
    model_path: Path,
    *,
    requested: str | Sequence[str] = "auto",
    provider_options: dict[str, dict[str, Any]] | None = None,
    threads: int = 0,
    spinning: bool = True,
    spin_after_run: bool = True,
) -> LoadedSession:
    """Create an InferenceSession on the best provider that actually starts."""
    import onnxruntime as ort

    candidates = choose_providers(requested, ort.get_available_providers())
    if "CUDAExecutionProvider" in candidates:
        load_cuda_libraries()
    provider_options = provider_options or {}
    errors: list[str] = []
    for index, provider in enumerate(candidates):
        chain = candidates[index:]
        try:
            session = ort.InferenceSession(
                str(model_path),
                sess_options=session_options(threads, spinning=spinning, spin_after_run=spin_after_run),
                providers=[(p, _option_values(provider_options.get(p, {}))) for p in chain],
                # ORT's own fallback prints to stdout and jumps straight to CPU; this loop logs instead.
                enable_fallback=0,
            )
        except Exception as exc:  # ORT raises plain RuntimeError/Fail for provider failures
            errors.append(f"{provider}: {exc}")
            log.warning("execution provider %s failed to start for %s: %s; falling back to %s",
                        provider, model_path.parent.name, exc, chain[1:] or "nothing")
            continue
        active = session.get_providers()[0]
        if active != provider:
            log.warning("execution provider %s was requested for %s but ONNX Runtime fell back to %s",
                        provider, model_path.parent.name, active)
        log.info("model %s runs on %s", model_path.parent.name, active)
        return LoadedSession(session=session, provider=active)
    raise ModelLoadError(f"no execution provider could load {model_path}: " + "; ".join(errors))
