"""The models a running server holds, looked up by the `model` field of each request."""

from __future__ import annotations

from collections.abc import Iterator

from fastllm.errors import ModelNotFoundError, WrongModelTypeError
from fastllm.runtime.models import ServedModel


class ModelRegistry:
    def __init__(self, models: list[ServedModel]) -> None:
        self._models = {model.id: model for model in models}
        self.draining = False

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(self._models.values())

    def __len__(self) -> int:
        return len(self._models)

    def get(self, model_id: str) -> ServedModel:
        try:
            return self._models[model_id]
        except KeyError:
            raise ModelNotFoundError(
                f"The model {model_id!r} does not exist. Available: {', '.join(self._models) or 'none'}",
                param="model",
            ) from None

    def generator(self, model_id: str) -> ServedModel:
        model = self.get(model_id)
        if model.generator is None:
            raise WrongModelTypeError(
                f"{model_id!r} is an embedding model; send it to /v1/embeddings", param="model"
            )
        return model

    def embedder(self, model_id: str) -> ServedModel:
        model = self.get(model_id)
        if model.embedder is None:
            raise WrongModelTypeError(
                f"{model_id!r} is a text-generation model; it cannot create embeddings", param="model"
            )
        return model

    def close(self) -> None:
        for model in self._models.values():
            model.close()
