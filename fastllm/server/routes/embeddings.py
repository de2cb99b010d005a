"""POST /v1/embeddings: strings or token ids in, OpenAI's list of embedding objects out."""

from __future__ import annotations

import base64

import msgspec
import numpy as np
from litestar import Controller, Response, post

from fastllm.errors import InvalidRequestError
from fastllm.runtime.models import ServedModel
from fastllm.server.metrics import Metrics
from fastllm.server.openapi import MODEL_ERRORS, responses
from fastllm.server.registry import ModelRegistry
from fastllm.server.requests import token_lists
from fastllm.server.schemas import EmbeddingData, EmbeddingRequest, EmbeddingResponse, Usage

MAX_INPUTS = 2048  # OpenAI's own limit per request


def _token_lists(model: ServedModel, body: EmbeddingRequest) -> list[list[int]]:
    if isinstance(body.input, list) and len(body.input) > MAX_INPUTS and not isinstance(body.input[0], int):
        raise InvalidRequestError(f"input holds {len(body.input)} items; at most {MAX_INPUTS} are allowed",
                                  param="input")
    # Truncate to what the model can attend to, as sentence-transformers does.
    return [ids[: model.context_length] for ids in token_lists(model, body.input, "input")]


def _encode(vector: np.ndarray, encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


class EmbeddingsController(Controller):
    path = "/v1/embeddings"
    tags = ["embeddings"]

    @post(status_code=200, summary="Create embeddings",
          responses=responses(EmbeddingResponse, "One embedding per input, in input order", *MODEL_ERRORS))
    async def create(self, data: EmbeddingRequest, registry: ModelRegistry, metrics: Metrics) -> Response[bytes]:
        model = registry.embedder(data.model)
        if data.dimensions is not None and data.dimensions != model.manifest.embedding_dim:
            raise InvalidRequestError(
                f"{model.id} produces {model.manifest.embedding_dim}-dimensional embeddings; "
                f"dimensions={data.dimensions} is not supported", param="dimensions",
            )
        batch = _token_lists(model, data)
        assert model.embedder is not None
        vectors = await model.embedder.embed(batch)
        tokens = sum(len(ids) for ids in batch)
        metrics.embedding_inputs.labels(model.id).inc(len(batch))
        metrics.prompt_tokens.labels(model.id).inc(tokens)
        body = EmbeddingResponse(
            data=[EmbeddingData(index=i, embedding=_encode(v, data.encoding_format)) for i, v in enumerate(vectors)],
            model=model.id,
            usage=Usage(prompt_tokens=tokens, total_tokens=tokens),
        )
        return Response(msgspec.json.encode(body), media_type="application/json")
