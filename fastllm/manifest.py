"""`fastllm.json`: the contract between `fastllm export` and `fastllm serve`.

Export writes it, serve reads it, and neither imports the other: the manifest carries every fact the
runtime needs (shapes of the KV cache, eos ids, pooling) so serving never has to load
transformers' config classes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

import msgspec

from fastllm.errors import CorruptModelError

MANIFEST_NAME = "fastllm.json"
FORMAT_VERSION = 1

Task = Literal["text-generation", "embedding"]


# The input of our decoder graphs that says how many of each row's last positions get logits (transformers'
# name for it): 1 for prefill and plain decoding, k + 1 for a step that verifies k drafted tokens.
LOGITS_TO_KEEP = "num_logits_to_keep"


class Quality(msgspec.Struct, kw_only=True):
    """How far a quantized export drifts from its PyTorch reference on a fixed text."""

    top1_agreement: float
    perplexity: float
    reference_perplexity: float
    # The reference's dtype: fp32, or fp16 where the export held the model at half precision (fused int4)
    reference_dtype: str = "fp32"


class Manifest(msgspec.Struct, kw_only=True, omit_defaults=True):
    format_version: int = FORMAT_VERSION
    name: str
    source: str
    revision: str | None = None
    # Hub sources: the commit `revision` resolved to when exporting (reproducibility).
    commit: str | None = None
    task: Task
    architecture: str
    model_type: str
    dtype: str = "fp32"
    quantization: str = "none"
    # int4/int8 weights: how many weights share one scale (MatMulNBits' block_size); 0 when not quantized
    block_size: int = 0
    onnx_file: str = "model.onnx"
    # The graph prompts run through where it differs from the decode graph (export/prefill_graph.py: int8
    # weights and activations beside int4 ones, on the CPU); "" = onnx_file for both.
    prefill_file: str = ""
    # "optimum": optimum's general decoder graph (left-padded batches, position_ids input).
    # "fused": ONNX Runtime GenAI's builder graph (GroupQueryAttention, fused norms; right-padded batches).
    graph: Literal["optimum", "fused"] = "optimum"
    # Which positions the graph's logits cover: "all" (as exported by others), "last-column" (our
    # left-padded graphs), "per-row" (each row's last real token: right-padded prompts batch together). Ours
    # since speculative decoding take ``num_logits_to_keep``: that many of each row's last positions.
    # Empty for exports older than this field; those prefill one prompt at a time.
    logits: Literal["", "all", "last-column", "per-row"] = ""
    num_layers: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    vocab_size: int = 0
    context_length: int = 512
    eos_token_ids: list[int] = msgspec.field(default_factory=list)
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    add_bos_token: bool = False
    has_position_ids: bool = True
    # Embedding models only: how token states become one vector.
    pooling: Literal["mean", "cls", "last"] | None = None
    normalize: bool = False
    embedding_dim: int | None = None
    quality: Quality | None = None
    prefill_quality: Quality | None = None  # prefill_file's, measured the same way
    tools: dict[str, str] = msgspec.field(default_factory=dict)
    files: dict[str, str] = msgspec.field(default_factory=dict)

    @property
    def is_generative(self) -> bool:
        return self.task == "text-generation"


def token_id_list(value: Any) -> list[int]:
    """transformers configs give special token ids as an int, a list, or nothing (None or False)."""
    if value is None or value is False:
        return []
    return [int(v) for v in value] if isinstance(value, list | tuple) else [int(value)]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path, manifest: Manifest) -> None:
    (folder / MANIFEST_NAME).write_bytes(msgspec.json.format(msgspec.json.encode(manifest), indent=2))


def read_manifest(folder: Path) -> Manifest:
    path = folder / MANIFEST_NAME
    try:
        return msgspec.json.decode(path.read_bytes(), type=Manifest)
    except FileNotFoundError:
        raise CorruptModelError(f"{folder} has no {MANIFEST_NAME}; it was not written by `fastllm export`") from None
    except msgspec.ValidationError as exc:
        raise CorruptModelError(f"{path} is invalid: {exc}") from None
    except msgspec.DecodeError as exc:
        raise CorruptModelError(f"{path} is not valid JSON: {exc}") from None


def is_model_dir(folder: Path) -> bool:
    return (folder / MANIFEST_NAME).is_file()
