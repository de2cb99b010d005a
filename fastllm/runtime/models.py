"""Find and load the models a server runs: a folder of `fastllm export`, or a hub repo of ONNX files."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from fastllm import hub
from fastllm.config import ModelConfig, RuntimeConfig
from fastllm.errors import ModelLoadError
from fastllm.manifest import Manifest, is_model_dir, read_manifest
from fastllm.runtime.decoder import Decoder
from fastllm.runtime.embedding import EmbeddingEngine
from fastllm.runtime.generation import GenerationEngine
from fastllm.tokenization import ChatTemplate, Tokenizer

log = logging.getLogger(__name__)

# Only what serving needs from a pre-exported hub repo.
_ONNX_PATTERNS = ["*.json", "*.onnx", "*.onnx_data", "*.onnx.data", "*.jinja", "*.txt"]


def resolve_model_dir(model_id: str, models_dir: Path, *, revision: str | None = None) -> Path:
    """``models/<id>``, ``models/<basename>``, a path, or a hub repo already holding a FastLLM export."""
    for candidate in (models_dir / model_id, models_dir / Path(model_id).name, Path(model_id).expanduser()):
        if is_model_dir(candidate):
            return candidate
    if hub.looks_like_repo_id(model_id):
        try:
            folder = hub.download(model_id, revision=revision, allow_patterns=_ONNX_PATTERNS)
        except Exception as exc:
            raise ModelLoadError(
                f"model {model_id!r} is not in {models_dir}/ and could not be fetched from the hub ({exc}). "
                f"Export it first: fastllm export {model_id}"
            ) from None
        if is_model_dir(folder):
            return folder
    raise ModelLoadError(
        f"model {model_id!r} was not found in {models_dir}/ nor as a path. Export it first: "
        f"fastllm export {model_id}"
    )


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

    @property
    def context_length(self) -> int:
        return self.manifest.context_length

    def close(self) -> None:
        for engine in (self.generator, self.embedder):
            if engine is not None:
                engine.close()


def load_model(config: ModelConfig, runtime: RuntimeConfig, models_dir: Path) -> ServedModel:
    folder = resolve_model_dir(config.model_id, models_dir, revision=config.revision)
    manifest = read_manifest(folder)
    tokenizer = Tokenizer(folder, max_length=manifest.context_length)
    served_id = config.served_model_name or manifest.name
    options = {"providers": runtime.providers, "provider_options": runtime.provider_options,
               "threads": runtime.threads}
    created = int(folder.joinpath("fastllm.json").stat().st_mtime)
    if manifest.is_generative:
        decoder = Decoder(folder, manifest, **options)
        engine = GenerationEngine(
            decoder, tokenizer, eos_token_ids=manifest.eos_token_ids, max_batch_size=runtime.max_batch_size,
            max_prefill_tokens=runtime.max_prefill_tokens, max_queue=runtime.max_queue, name=served_id,
        )
        template = ChatTemplate.for_model(folder, tokenizer.config, bos_token=tokenizer.bos_token,
                                          eos_token=tokenizer.eos_token)
        model = ServedModel(served_id, folder, manifest, tokenizer, decoder.provider, template,
                            generator=engine, created=created)
    else:
        embedder = EmbeddingEngine(folder, manifest, batch_size=runtime.embedding_batch_size, **options)
        model = ServedModel(served_id, folder, manifest, tokenizer, embedder.provider, embedder=embedder,
                            created=created)
    log.info("loaded %s (%s, %s, %s) from %s on %s", served_id, manifest.task, manifest.dtype,
             manifest.quantization, folder, model.provider)
    return model
