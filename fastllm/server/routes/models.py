"""GET /v1/models and /v1/models/{id} (the seed's TODO), with FastLLM's facts beside OpenAI's."""

from __future__ import annotations

from litestar import Controller, get

from fastllm.runtime.models import ServedModel
from fastllm.server.openapi import responses
from fastllm.server.registry import ModelRegistry
from fastllm.server.schemas import ModelCard, ModelList


def card(model: ServedModel) -> ModelCard:
    m = model.manifest
    memory = {}
    if (engine := model.generator) is not None:
        memory = {"kv_cache_bytes": engine.kv_bytes(), "kv_budget_bytes": engine.kv_budget_bytes or 0}
        if engine.prefix_cache is not None:
            memory |= {"prefix_cache_bytes": engine.prefix_cache.used_bytes,
                       "prefix_cache_budget_bytes": engine.prefix_cache.budget_bytes}
    return ModelCard(id=model.id, created=model.created, task=m.task, provider=model.provider, dtype=m.dtype,
                     quantization=m.quantization, context_length=m.context_length, max_model_len=m.context_length,
                     **memory)


class ModelsController(Controller):
    path = "/v1/models"
    tags = ["models"]

    @get(summary="List models", responses=responses(ModelList, "The served models", 401, 503))
    async def list_models(self, registry: ModelRegistry) -> ModelList:
        return ModelList(data=[card(m) for m in registry])

    @get("/{model_id:path}", summary="Retrieve a model",
         responses=responses(ModelCard, "The model", 401, 404, 503))
    async def retrieve(self, model_id: str, registry: ModelRegistry) -> ModelCard:
        return card(registry.get(model_id.lstrip("/")))
