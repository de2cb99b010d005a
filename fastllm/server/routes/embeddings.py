"""POST /v1/embeddings: strings or token ids in, OpenAI's list of embedding objects out."""

from __future__ import annotations

import base64

import msgspec
import numpy as np
from litestar import Controller, Response, post

from fastllm.errors import InvalidRequestError
from fastllm.runtime.models import ServedModel
from fastllm.server.metrics import Metrics
from fastllm.server.registry import ModelRegistry
from fastllm.server.requests import check_token_ids
from fastllm.server.schemas import EmbeddingData, EmbeddingRequest, EmbeddingResponse, Usage

MAX_INPUTS = 2048  # OpenAI's own limit per request


def _token_lists(model: ServedModel, body: EmbeddingRequest) -> list[list[int]]:
    raw = body.input
    if isinstance(raw, str):
        raw = [raw]
    if not raw:
        raise InvalidRequestError("input must not be empty", param="input")
    if len(raw) > MAX_INPUTS:
        raise InvalidRequestError(f"input holds {len(raw)} items; at most {MAX_INPUTS} are allowed",
                                  param="input")
    if all(isinstance(item, int) for item in raw):
        raw = [raw]  # one token-id array
    lists: list[list[int]] = []
    limit = model.context_length
    for i, item in enumerate(raw):
        if isinstance(item, str):
            if not item:
                raise InvalidRequestError(f"input[{i}] is an empty string", param="input")
            ids = model.tokenizer.encode(item)
        else:
            ids = list(item)  # type: ignore[arg-type]
            check_token_ids(model, ids, "input")
        lists.append(ids[:limit])  # truncate to what the model can attend to, as sentence-transformers does
    return lists


def _encode(vector: np.ndarray, encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


class EmbeddingsController(Controller):
    path = "/v1/embeddings"
    tags = ["embeddings"]

    @post(status_code=200, summary="Create embeddings")
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
