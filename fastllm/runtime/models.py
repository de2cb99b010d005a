"""Find and load the models a server runs: a folder of `fastllm export`, or a hub repo of ONNX files."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastllm import hub
from fastllm.config import ModelConfig, RuntimeConfig
from fastllm.errors import FastLLMError, ModelLoadError
from fastllm.manifest import Manifest, is_model_dir, read_manifest, token_id_list
from fastllm.runtime.decoder import ROUNDING, Decoder
from fastllm.runtime.draft_model import ModelDrafter
from fastllm.runtime.embedding import EmbeddingEngine
from fastllm.runtime.generation import GenerationEngine
from fastllm.runtime.grammar import GrammarCompiler
from fastllm.runtime.prefix_cache import PrefixCache
from fastllm.runtime.speculation import Drafter, PromptLookupDrafter
from fastllm.tokenization import ChatTemplate, Tokenizer
from fastllm.tokenization.tool_calls import FALLBACK, ToolCallSyntax, detect_syntax

log = logging.getLogger(__name__)

# Only what serving needs from a hub repo of ONNX files: configs, tokenizer and the fp32 graph, not every
# quantized variant that repos such as onnx-community's carry beside it.
_ONNX_PATTERNS = ["*.json", "*.jinja", "*.txt", "model.onnx*", "onnx/model.onnx*", "1_Pooling/*"]


def resolve_model(model_id: str, models_dir: Path, *, revision: str | None = None) -> tuple[Path, Manifest]:
    """``models/<id>``, ``models/<basename>``, a path, or a hub repo of ONNX files; with its manifest."""
    for candidate in (models_dir / model_id, models_dir / Path(model_id).name, Path(model_id).expanduser()):
        if is_model_dir(candidate):
            return candidate, read_manifest(candidate)
    if hub.looks_like_repo_id(model_id):
        try:
            folder = hub.download(model_id, revision=revision, allow_patterns=_ONNX_PATTERNS)
        except FastLLMError as exc:
            raise ModelLoadError(
                f"model {model_id!r} is not in {models_dir}/ and could not be fetched from the hub: {exc.message}. "
                f"Export it first: fastllm export {model_id}"
            ) from None
        if is_model_dir(folder):
            return folder, read_manifest(folder)
        manifest = infer_manifest(folder, model_id, revision)
        if manifest is not None:
            return folder, manifest
        raise ModelLoadError(f"hub repo {model_id!r} holds no ONNX decoder or encoder; run: fastllm export {model_id}")
    raise ModelLoadError(
        f"model {model_id!r} was not found in {models_dir}/ nor as a path. Export it first: "
        f"fastllm export {model_id}"
    )


def infer_manifest(folder: Path, model_id: str, revision: str | None) -> Manifest | None:
    """A manifest for an ONNX repo that `fastllm export` did not write (onnx-community's layout, or
    optimum-cli's), from its transformers config files alone."""
    onnx_file = next((f for f in ("onnx/model.onnx", "model.onnx") if (folder / f).is_file()), None)
    config = _json(folder / "config.json")
    if onnx_file is None or not config:
        return None
    generation = _json(folder / "generation_config.json")
    heads = int(config.get("num_attention_heads", 0))
    generative = any(a.endswith("ForCausalLM") for a in config.get("architectures", []))
    modules = json.dumps(_json(folder / "modules.json") or [])
    return Manifest(
        name=model_id, source=model_id, revision=revision,
        task="text-generation" if generative else "embedding",
        architecture=(config.get("architectures") or ["unknown"])[0], model_type=config.get("model_type", "unknown"),
        onnx_file=onnx_file, logits="all",
        num_layers=int(config.get("num_hidden_layers", 0)),
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or (config.get("hidden_size", 0) // heads if heads else 0)),
        vocab_size=int(config.get("vocab_size", 0)),
        context_length=int(config.get("max_position_embeddings") or 2048),
        eos_token_ids=token_id_list(generation.get("eos_token_id", config.get("eos_token_id"))),
        bos_token_id=generation.get("bos_token_id", config.get("bos_token_id")),
        pad_token_id=generation.get("pad_token_id", config.get("pad_token_id")),
        pooling=None if generative else "mean",
        normalize=not generative and "Normalize" in modules,
        embedding_dim=None if generative else config.get("hidden_size"),
    )


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


@dataclass
class ServedModel:
    id: str
    folder: Path
    manifest: Manifest
    tokenizer: Tokenizer
    provider: str
    chat_template: ChatTemplate | None = None
    generator: GenerationEngine | None = None
    embedder: EmbeddingEngine | None = None
    created: int = 0
    grammars: GrammarCompiler | None = None
    tool_syntax: ToolCallSyntax = FALLBACK

    @property
    def context_length(self) -> int:
        return self.manifest.context_length

    def close(self) -> None:
        for engine in (self.generator, self.embedder):
            if engine is not None:
                engine.close()


def _drafter(config: ModelConfig, tokenizer: Tokenizer, models_dir: Path, options: dict[str, Any]) -> Drafter | None:
    """The speculative-decoding drafter the model's config asks for, if any."""
    if config.speculative == "ngram":
        return PromptLookupDrafter(config.speculative_tokens)
    if config.speculative != "draft":
        return None
    if not config.draft_model:
        raise ModelLoadError(f'speculative = "draft" needs draft_model for {config.model_id}')
    folder, manifest = resolve_model(config.draft_model, models_dir)
    if not manifest.is_generative:
        raise ModelLoadError(f"draft model {config.draft_model} is not a text-generation model")
    if Tokenizer(folder).vocabulary() != tokenizer.vocabulary():
        raise ModelLoadError(f"draft model {config.draft_model} does not share {config.model_id}'s tokenizer: "
                             "its token ids would mean other text")
    # It catches up on a prompt in small steps through its decode graph: a prompt graph would only hold memory.
    decoder = Decoder(folder, manifest, spinning=False, prefill_graph=False, **options)
    log.info("speculative decoding for %s drafts with %s (%s, %s)", config.model_id, manifest.name,
             manifest.quantization, decoder.provider)
    return ModelDrafter(decoder, config.speculative_tokens, manifest.context_length)


def load_model(config: ModelConfig, runtime: RuntimeConfig, models_dir: Path) -> ServedModel:
    folder, manifest = resolve_model(config.model_id, models_dir, revision=config.revision)
    tokenizer = Tokenizer(folder, max_length=manifest.context_length)
    served_id = config.served_model_name or manifest.name
    options = {"providers": runtime.providers, "provider_options": runtime.provider_options,
               "threads": runtime.threads}
    decoder_options = {**options, "prefill_graph": runtime.prefill_graph}
    created = int((folder / manifest.onnx_file).stat().st_mtime) if (folder / manifest.onnx_file).exists() else 0
    if manifest.is_generative:
        # A draft model's session and this one take turns on the same cores: neither may spin while idle.
        decoder = Decoder(folder, manifest, io_binding=runtime.io_binding, spinning=config.speculative != "draft",
                          beside=runtime.prefill_beside, **decoder_options)
        _check_batch_invariance(decoder, runtime.int8_decode_rows, served_id)
        prefix_cache = PrefixCache(runtime.prefix_cache_mb * 2**20) if runtime.prefix_cache_mb else None
        engine = GenerationEngine(
            decoder, tokenizer, eos_token_ids=manifest.eos_token_ids, max_batch_size=runtime.max_batch_size,
            max_prefill_tokens=runtime.max_prefill_tokens, max_queue=runtime.max_queue, name=served_id,
            prefix_cache=prefix_cache, prefill_chunk=runtime.prefill_chunk_tokens,
            prefill_stall_ratio=runtime.prefill_stall_ratio,
            kv_budget_bytes=runtime.kv_budget_mb * 2**20 if runtime.kv_budget_mb else None,
            int8_decode_rows=runtime.int8_decode_rows,
            drafter=_drafter(config, tokenizer, models_dir, options),
        )
        template = ChatTemplate.for_model(folder, tokenizer.config, bos_token=tokenizer.bos_token,
                                          eos_token=tokenizer.eos_token)
        grammars = GrammarCompiler(folder / "tokenizer.json", vocab_size=manifest.vocab_size or tokenizer.vocab_size,
                                   eos_token_ids=manifest.eos_token_ids)
        syntax = detect_syntax(template.source, renders_tools=template.renders_tools,
                               override=config.tool_call_format)
        model = ServedModel(served_id, folder, manifest, tokenizer, decoder.provider, template,
                            generator=engine, created=created, grammars=grammars, tool_syntax=syntax)
    else:
        embedder = EmbeddingEngine(folder, manifest, batch_size=runtime.embedding_batch_size, **options)
        model = ServedModel(served_id, folder, manifest, tokenizer, embedder.provider, embedder=embedder,
                            created=created)
    log.info("loaded %s (%s, %s, %s) from %s on %s", served_id, manifest.task, manifest.dtype,
             manifest.quantization, folder, model.provider)
    return model


def _check_batch_invariance(decoder: Decoder, int8_decode_rows: int, name: str) -> None:
    """``int8_decode_rows = 0`` is the setting for greedy answers that do not depend on the load, which holds only
    where this CPU computes a row alike alone and batched (see Decoder.one_row_drift): say so where it does not,
    and what does hold here, instead of letting an evaluation find out."""
    if int8_decode_rows or decoder.provider != "CPUExecutionProvider":
        return
    drift = decoder.one_row_drift()
    if drift <= ROUNDING:
        return
    remedy = ("int8_decode_rows = 1 (every step through the int8 prompt graph, whose rows compute alike) gives them "
              "here" if decoder.has_prefill_graph and decoder.one_row_drift(prompt=True) <= ROUNDING
              else "no setting gives them for this export here")
    log.warning("%s: int8_decode_rows = 0 asks for greedy answers that do not depend on the batch, but on this CPU "
                "ONNX Runtime computes a one-row decode step with a kernel of its own (logits up to %.2g apart alone "
                "and batched), so answers alone and under load may differ; %s", name, drift, remedy)
