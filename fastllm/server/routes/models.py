"""GET /v1/models and /v1/models/{id} (the seed's TODO), with FastLLM's facts beside OpenAI's."""

from __future__ import annotations

from litestar import Controller, get

from fastllm.runtime.models import ServedModel
from fastllm.server.openapi import responses
from fastllm.server.registry import ModelRegistry
from fastllm.server.schemas import ModelCard, ModelList


def card(model: ServedModel) -> ModelCard:
    m = model.manifest
    return ModelCard(id=model.id, created=model.created, task=m.task, provider=model.provider, dtype=m.dtype,
                     quantization=m.quantization, context_length=m.context_length, max_model_len=m.context_length)


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
