"""`fastllm export`: resolve → load → ONNX → rewrite (fp16 / int8 / int4) → validate → manifest.

Everything is written into a hidden temporary folder beside the output and renamed into place at
the very end, so an interrupted export never leaves a half model that `serve` could pick up.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import inspect
import logging
import os
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

from fastllm.errors import ExportError, MissingExtraError, OutputExistsError
from fastllm.export import fused, memory, prefill_graph, sources, validate
from fastllm.manifest import Manifest, sha256_file, token_id_list, write_manifest

log = logging.getLogger(__name__)

TOOLS = ("fastllm", "torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime")


@dataclass
class ExportOptions:
    source: str
    output: Path | None = None
    models_dir: Path = Path("models")
    revision: str | None = None
    token: str | None = None
    task: str = "auto"  # auto | text-generation | embedding
    dtype: str = "fp32"  # fp32 | fp16 | bf16
    quantize: str = "none"  # none | int8 | int4
    # Weights per quantization scale. 32 is Q4_0's and the most faithful; 128 (AWQ's and GPTQ's usual group)
    # decodes and prefills 10-20% faster on CPUs and loses more (figures in the README's export options).
    block_size: int = 32
    trust_remote_code: bool = False
    force: bool = False
    validate: bool = True
    # auto | optimum | fused (ONNX Runtime GenAI's builder, see export/fused.py); auto = fused where it can be
    graph: str = "auto"
    name: str | None = None  # the served model id; default: the hub id, or the file/folder name
    max_memory_gb: float | None = None  # refuse exports estimated above this; default: what is available
    # int4 fused graphs for CPUs: "auto" | "int8" | "none", a second graph for prompts (export/prefill_graph.py)
    prefill_graph: str = "auto"


def default_output(options: ExportOptions, checkpoint: sources.Checkpoint) -> Path:
    if options.name:
        return options.models_dir / Path(options.name).name
    return options.models_dir / (Path(checkpoint.name).name + _variant(options))


def _variant(options: ExportOptions) -> str:
    """The name suffix: "-int4", "-fp16", or "-fp16-int4" (the fused int4 graph for GPUs, beside the CPU's)."""
    parts = [options.dtype if options.dtype != "fp32" else "", options.quantize if options.quantize != "none" else ""]
    return "".join(f"-{part}" for part in parts if part)


def _check_block_size(options: ExportOptions, hidden: object) -> None:
    """The fused int4 graph quantizes the embedding table in blocks along the hidden size and reads it back
    whole: a block must divide it (SmolLM2's 576 takes 32 or 64, not 128)."""
    if options.graph == "fused" and options.quantize == "int4" and isinstance(hidden, int) and \
            hidden % options.block_size:
        fits = [size for size in (128, 64, 32) if hidden % size == 0]
        raise ExportError(f"--block-size {options.block_size} does not divide this model's hidden size ({hidden}); "
                          f"use {' or '.join(map(str, fits)) or 'the optimum graph'}")


def export(options: ExportOptions) -> Path:
    started = time.perf_counter()
    _check_dtype(options)
    log.info("[1/5] resolving %s", options.source)
    checkpoint = sources.resolve(options.source, revision=options.revision, token=options.token,
                                 task=options.task)
    options = replace(options, graph=choose_graph(options, checkpoint))
    if options.prefill_graph == "int8" and not _prefill_graph_fits(options):
        raise ExportError("--prefill-graph int8 goes with --graph fused --quantize int4 (and fp32 activations)")
    output = options.output or default_output(options, checkpoint)
    if output.exists() and not options.force:
        raise OutputExistsError(f"{output} already exists; pass --force to replace it")
    if options.graph == "fused" and not fused.supported(checkpoint.model_type, options.dtype, options.quantize):
        raise ExportError(
            f"--graph fused covers {', '.join(sorted(fused.FUSED_ARCHITECTURES))} at fp32, fp16 or int4; "
            f"not {checkpoint.model_type} with dtype={options.dtype} quantize={options.quantize}"
        )

    working = working_dtype(options)
    memory.check_fits(memory.parameter_count(checkpoint.folder, checkpoint.gguf_file, checkpoint.config), working,
                      options.max_memory_gb)
    log.info("[2/5] loading %s (%s, %s) at %s", checkpoint.name, checkpoint.model_type, checkpoint.task, working)
    model, tokenizer = sources.load(checkpoint, trust_remote_code=options.trust_remote_code, dtype=working)
    _check_block_size(options, getattr(model.config, "hidden_size", None))

    output.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_staging(output)
    staging = output.parent / f".{output.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        manifest = _manifest(options, checkpoint, model, tokenizer)
        generative = checkpoint.task == "text-generation"
        quantized = options.quantize != "none" or options.dtype != "fp32"
        expected = None
        if options.validate and generative:
            # PyTorch answers first: the model can then go before ONNX Runtime loads the graph to validate it.
            expected = validate.reference(model, tokenizer, manifest, quality=quantized)
        log.info("[3/5] exporting to ONNX (%s graph)", options.graph)
        if options.graph == "fused":
            saved = fused.save_checkpoint(model, tokenizer, staging)
            del model  # the builder loads its own copy
            _release_memory()
            fused.build(saved, manifest.model_type, staging, dtype=options.dtype, quantization=options.quantize,
                        block_size=options.block_size)
        else:
            _to_onnx(model, checkpoint, staging)
            del model
        _release_memory()
        tokenizer.save_pretrained(staging)
        _drop_redundant_tokenizer_files(staging)
        manifest.has_position_ids = "position_ids" in _graph_inputs(staging / manifest.onnx_file)
        manifest.graph = "fused" if options.graph == "fused" else "optimum"
        if options.graph == "fused":
            log.info("[4/5] the builder wrote the graph at dtype=%s quantize=%s; no rewrite", options.dtype,
                     options.quantize)
        elif quantized:
            log.info("[4/5] rewriting graph: dtype=%s quantize=%s", options.dtype, options.quantize)
            from fastllm.export.quantize import rewrite

            rewrite(staging / manifest.onnx_file, dtype=options.dtype, quantization=options.quantize,
                    block_size=options.block_size)
        else:
            log.info("[4/5] keeping the fp32 graph as exported (no --dtype/--quantize rewrite)")
        if generative:
            from fastllm.export.quantize import keep_last_logits

            if expected is not None and quantized:
                manifest.quality = validate.measure_quality(staging, manifest, expected)
            keep_last_logits(staging / manifest.onnx_file, right_padded=manifest.graph == "fused")
            manifest.logits = "per-row" if manifest.graph == "fused" else "last-column"
            built = _prefill_graph(options, staging / manifest.onnx_file, staging / "tokenizer.json",
                                   manifest.context_length)
            if built is not None:
                manifest.prefill_file = built.name
                if expected is not None:
                    manifest.prefill_quality = validate.measure_quality(staging, manifest, expected,
                                                                        prompt_graph=True)
        if options.validate:
            log.info("[5/5] validating against PyTorch")
            if expected is not None:
                validate.check_greedy(staging, manifest, expected, tokenizer)
            else:
                validate.validate_embedding(staging, manifest, checkpoint.folder, tokenizer)
        else:
            log.warning("[5/5] validation skipped (--no-validate): nothing checked this graph against PyTorch")
        shutil.rmtree(staging / ".checkpoint", ignore_errors=True)
        manifest.files = {
            p.name: sha256_file(p) for p in sorted(staging.iterdir()) if p.is_file()
        }
        write_manifest(staging, manifest)
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    size = sum(p.stat().st_size for p in output.iterdir() if p.is_file())
    log.info("exported %s to %s (%.1f MB) in %.1fs, peak memory %.2f GB", manifest.name, output, size / 1e6,
             time.perf_counter() - started, memory.peak_rss() / 1e9)
    return output


def _prefill_graph_fits(options: ExportOptions) -> bool:
    """The int8 prompt graph is made from a fused int4 graph for CPUs (fp32 activations), and runs there only."""
    return options.graph == "fused" and options.quantize == "int4" and options.dtype == "fp32"


def _prefill_graph(options: ExportOptions, onnx_path: Path, tokenizer_file: Path, context_length: int) -> Path | None:
    """The prompt graph where wanted. Under ``auto`` it is an extra: a failure to build it leaves the export
    without one (and says why); asked for by name, it must be built."""
    if not _prefill_graph_fits(options) or not prefill_graph.wanted(options.prefill_graph, onnx_path):
        return None
    try:
        built = prefill_graph.build(onnx_path, tokenizer_file, context_length)
    except Exception as exc:
        if options.prefill_graph == "int8":
            raise ExportError(f"could not build the int8 prompt graph: {exc}") from exc
        log.warning("no int8 prompt graph (prompts will run through the int4 graph): %s", exc)
        for leftover in onnx_path.parent.glob(prefill_graph.PREFILL_ONNX + "*"):
            leftover.unlink()
        return None
    if built is None and options.prefill_graph == "int8":
        raise ExportError("--prefill-graph int8: this graph has no int4 weights to convert")
    return built


def working_dtype(options: ExportOptions) -> str:
    """The precision the PyTorch model is held at while exporting. fp32 wherever a graph is traced from it
    or must reproduce it exactly; fp16 for the fused graph at int4 or fp16, whose builder casts each weight
    itself: the model's copies (loading, the builder's, the validation reference) then take half the memory,
    which is what lets a 7B model export to int4 on a 32 GB machine. The int4 rounding of an fp16 weight
    equals that of its fp32 original but at rare ties; the quality figures are then measured against the
    fp16 reference, and say so (`quality.reference_dtype`)."""
    fused_half = options.graph == "fused" and (options.quantize == "int4" or options.dtype == "fp16")
    return "fp16" if fused_half else "fp32"


def _release_memory() -> None:
    """Hand freed memory back to the system between the export's stages. Each stage (loading, the builder,
    validation) allocates gigabytes; glibc keeps much of what a stage freed in its heaps, so without this
    the next stage adds its peak on top of the last one's."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _remove_abandoned_staging(output: Path) -> None:
    """Delete staging folders of earlier exports to ``output`` whose process died (SIGKILL, power loss)."""
    for folder in output.parent.glob(f".{output.name}.partial-*"):
        pid = folder.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _process_alive(int(pid)):
            log.info("removing %s, left by an export that did not finish", folder)
            shutil.rmtree(folder, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def choose_graph(options: ExportOptions, checkpoint: sources.Checkpoint) -> str:
    """``--graph auto``: the fused graph (twice as fast to serve on CPUs, the only int4 for GPUs) wherever the
    builder covers the architecture, dtype and quantization; optimum's general graph otherwise."""
    if options.graph != "auto":
        return options.graph
    fits = checkpoint.task == "text-generation" and fused.supported(checkpoint.model_type, options.dtype,
                                                                    options.quantize)
    graph = "fused" if fits else "optimum"
    if options.dtype == "fp16" and options.quantize != "none" and graph != "fused":
        raise ExportError(f"--dtype fp16 --quantize {options.quantize} needs the fused graph, which covers "
                          f"{', '.join(sorted(fused.FUSED_ARCHITECTURES))} with int4; not {checkpoint.model_type}")
    log.info("--graph auto: the %s graph for %s (%s, %s)", graph, checkpoint.model_type, options.dtype,
             options.quantize)
    return graph


def _check_dtype(options: ExportOptions) -> None:
    if options.dtype == "bf16":
        raise ExportError(
            "bf16 ONNX graphs have no kernels for most operators in ONNX Runtime's CPU and CUDA providers; "
            "use --dtype fp16 for GPUs or --quantize int4 for CPUs"
        )
    gpu_int4 = options.graph in ("fused", "auto") and options.quantize == "int4"
    if options.dtype == "fp16" and options.quantize != "none" and not gpu_int4:
        raise ExportError("--dtype fp16 and --quantize cannot be combined, except --graph fused --quantize int4 "
                          "(int4 for GPUs); optimum's int4/int8 graphs keep fp32 activations")
    if options.dtype == "fp16":
        log.warning("fp16 pays off on GPUs (CUDA, CoreML); on CPUs ONNX Runtime runs fp16 graphs slower than fp32 "
                    "and --quantize int4 is the faster choice")


def _to_onnx(model: Any, checkpoint: sources.Checkpoint, staging: Path) -> None:
    try:
        from optimum.exporters.onnx import onnx_export_from_model
    except ImportError:  # optimum without the optimum-onnx distribution that provides this module
        raise MissingExtraError("export", "optimum-onnx") from None

    task = "text-generation-with-past" if checkpoint.task == "text-generation" else "feature-extraction"
    try:
        custom = _position_ids_config(model) if checkpoint.task == "text-generation" else None
        with _quiet_tracing():
            onnx_export_from_model(model, staging, task=task, do_validation=False, custom_onnx_configs=custom)
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise ExportError(f"optimum could not export {checkpoint.source}: {exc}") from None


def _position_ids_config(model: Any) -> dict[str, Any] | None:
    """optimum's decoder config for the model, given a ``position_ids`` input where it has none (Gemma).

    Without it the graph numbers positions by the KV-cache length, which is wrong for every row that
    is left-padded in a batch or whose cache the runtime compacts: RoPE then sees shifted distances.
    """
    from optimum.exporters.tasks import TasksManager

    constructor = TasksManager.get_exporter_config_constructor(
        exporter="onnx", model=model, task="text-generation-with-past", library_name="transformers"
    )
    default = constructor(model.config)
    if "position_ids" in default.inputs:
        return None
    if "position_ids" not in inspect.signature(model.forward).parameters:
        return None

    class WithPositionIds(type(default)):  # type: ignore[misc]
        @property
        def inputs(self) -> dict[str, dict[int, str]]:
            inputs = super().inputs
            inputs["position_ids"] = {0: "batch_size", 1: "sequence_length"}
            return inputs

    config = WithPositionIds(model.config, task="text-generation", use_past=True, use_past_in_inputs=True,
                             float_dtype=default.float_dtype, int_dtype=default.int_dtype)
    return {"model": config}


def _graph_inputs(onnx_path: Path) -> set[str]:
    import onnx

    return {i.name for i in onnx.load(str(onnx_path), load_external_data=False).graph.input}


class _TiedWeightNotice(logging.Filter):
    """Drops optimum's warning that a tied lm_head got its own initializer in the traced graph: the
    expected case for every tied-embedding model, which optimum then deduplicates itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Found different candidate ONNX initializers") or message.startswith("\t"))


@contextlib.contextmanager
def _quiet_tracing() -> Iterator[None]:
    """Hide the TorchScript tracer's warnings: dozens of lines per export about Python control flow
    frozen into the graph, which the cached-decoder layout accounts for and validation then checks."""
    from torch.jit import TracerWarning

    optimum_log = logging.getLogger("optimum")
    notice = _TiedWeightNotice()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TracerWarning)
        warnings.filterwarnings("ignore", message=r"Exporting aten::index operator", category=UserWarning)
        optimum_log.addFilter(notice)
        try:
            yield
        finally:
            optimum_log.removeFilter(notice)


def _drop_redundant_tokenizer_files(folder: Path) -> None:
    # tokenizer.json is all the serve side reads; slow-tokenizer vocab files only bloat the bundle.
    if (folder / "tokenizer.json").is_file():
        for name in ("tokenizer.model", "vocab.txt", "vocab.json", "merges.txt", "sentencepiece.bpe.model"):
            (folder / name).unlink(missing_ok=True)


def _manifest(options: ExportOptions, checkpoint: sources.Checkpoint, model: Any, tokenizer: Any) -> Manifest:
    config = model.config
    heads = getattr(config, "num_attention_heads", 0)
    head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else 0)
    eos = token_id_list(getattr(model, "generation_config", None) and model.generation_config.eos_token_id)
    eos += [i for i in token_id_list(config.eos_token_id) if i not in eos]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    probe = tokenizer("a")["input_ids"]
    name = options.name or checkpoint.name + _variant(options)
    return Manifest(
        name=name,
        source=checkpoint.source,
        revision=checkpoint.revision,
        commit=checkpoint.commit,
        task=checkpoint.task,  # type: ignore[arg-type]
        architecture=(config.architectures or [type(model).__name__])[0],
        model_type=config.model_type,
        dtype=options.dtype,
        quantization=options.quantize,
        block_size=options.block_size if options.quantize != "none" else 0,
        num_layers=config.num_hidden_layers,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        vocab_size=config.vocab_size,
        context_length=_context_length(config, tokenizer),
        eos_token_ids=eos if checkpoint.task == "text-generation" else [],
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        add_bos_token=bool(tokenizer.bos_token_id is not None and probe and probe[0] == tokenizer.bos_token_id),
        pooling=checkpoint.pooling,  # type: ignore[arg-type]
        normalize=checkpoint.normalize,
        embedding_dim=config.hidden_size if checkpoint.task == "embedding" else None,
        tools={tool: _version(tool) for tool in TOOLS},
    )


def _context_length(config: Any, tokenizer: Any) -> int:
    length = getattr(config, "max_position_embeddings", None) or 2048
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < length:
        length = limit
    rope = getattr(config, "rope_scaling", None) or {}
    original = getattr(config, "original_max_position_embeddings", None)
    if rope.get("rope_type", rope.get("type")) in ("longrope", "su") and original and original < length:
        # LongRoPE (Phi-3-128k, Phi-3.5) switches rotary factors once a sequence outgrows the original
        # window: Python control flow that tracing freezes on the short branch, so beyond that window
        # the graph would silently diverge from the model. Serve only the window it reproduces.
        log.warning("LongRoPE model: context limited to the original %d positions (config says %d); the "
                    "traced graph only reproduces the short-context rotary factors", original, length)
        length = original
    return int(length)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"
