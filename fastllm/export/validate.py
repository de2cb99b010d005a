"""Check an export against its PyTorch model before it is allowed to exist.

fp32 must reproduce PyTorch's greedy tokens exactly; quantized graphs are measured instead
(teacher-forced top-1 agreement and perplexity on a fixed text) and the figures go into the manifest,
so users choose a quantization by evidence.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from fastllm.errors import ExportError
from fastllm.manifest import Manifest, Quality
from fastllm.runtime.decoder import Decoder
from fastllm.runtime.generation import greedy_tokens

log = logging.getLogger(__name__)

GREEDY_TOKENS = 32
PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
]
QUALITY_TEXT = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is "
    "named after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to "
    "1889. Locally nicknamed La dame de fer, it was constructed as the centrepiece of the 1889 World's "
    "Fair, and to crown the centennial anniversary of the French Revolution."
)


def greedy_onnx(decoder: Decoder, prompt: list[int], new_tokens: int, eos: set[int]) -> list[int]:
    """Greedy decoding through the same Decoder and cache code the server runs."""
    tokens: list[int] = []
    for token in islice(greedy_tokens(decoder, prompt), new_tokens):
        tokens.append(token)
        if token in eos:
            break
    return tokens


def _prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    if tokenizer.chat_template:
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
    return list(tokenizer(messages[-1]["content"])["input_ids"])


@dataclass
class Reference:
    """What PyTorch answers, computed once while the model is loaded, so that the export can let go of the
    model before ONNX Runtime loads the graph (two copies of the model would set the export's peak memory)."""

    dtype: str  # the PyTorch model's: fp32, or fp16 for exports that hold the model at fp16
    greedy: list[tuple[str, list[int], list[int]]] = field(default_factory=list)  # question, prompt, tokens
    quality_ids: list[int] = field(default_factory=list)
    top1: np.ndarray | None = None  # PyTorch's argmax at each position of QUALITY_TEXT
    perplexity: float = 0.0


def reference(model: Any, tokenizer: Any, manifest: Manifest, *, quality: bool) -> Reference:
    """PyTorch's greedy tokens for PROMPTS and, with ``quality``, its teacher-forced view of QUALITY_TEXT."""
    import torch

    dtype = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(model.dtype, "fp32")
    found = Reference(dtype=dtype)
    eos = list(manifest.eos_token_ids) or None
    with torch.no_grad():
        for messages in PROMPTS:
            prompt = _prompt_ids(tokenizer, messages)
            input_ids = torch.tensor([prompt])
            generated = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                       max_new_tokens=GREEDY_TOKENS, do_sample=False, eos_token_id=eos,
                                       pad_token_id=manifest.pad_token_id)
            found.greedy.append((messages[-1]["content"], prompt, generated[0, len(prompt):].tolist()))
        if quality:
            ids = tokenizer(QUALITY_TEXT, add_special_tokens=False)["input_ids"]
            logits = model(torch.tensor([ids])).logits[0].float().numpy()
            found.quality_ids, found.top1 = ids, logits.argmax(-1)
            found.perplexity = _perplexity(logits, ids)
    return found


def check_greedy(folder: Path, manifest: Manifest, expected: Reference, tokenizer: Any) -> None:
    """fp32 graphs must reproduce PyTorch's greedy tokens; every graph's answers are logged."""
    decoder = Decoder(folder, manifest, providers=["CPUExecutionProvider"])
    eos = set(manifest.eos_token_ids)
    exact = manifest.dtype == "fp32" and manifest.quantization == "none"
    for question, prompt, pytorch in expected.greedy:
        ours = greedy_onnx(decoder, prompt, GREEDY_TOKENS, eos)
        log.info("validate: %r -> %r", question, tokenizer.decode(ours, skip_special_tokens=True))
        if exact and ours != pytorch:
            raise ExportError(
                "validation failed: ONNX Runtime's greedy tokens differ from PyTorch's for "
                f"{question!r}:\n  onnx:    {ours}\n  pytorch: {pytorch}"
            )


def measure_quality(folder: Path, manifest: Manifest, expected: Reference, *, prompt_graph: bool = False) -> Quality:
    """Teacher-forced agreement and perplexity against PyTorch, of the decode graph or (``prompt_graph``) the
    prompt graph; needs logits at every position: before the export keeps only the last position's, or from a
    graph that takes how many to keep."""
    assert expected.top1 is not None, "the reference was computed without quality=True"
    decoder = Decoder(folder, manifest, providers=["CPUExecutionProvider"], prefill_graph=prompt_graph)
    ids = expected.quality_ids
    batch = np.asarray([ids], dtype=np.int64)
    ours = decoder.forward(batch, np.ones_like(batch), np.arange(len(ids))[None, :], decoder.empty_past(1),
                           all_logits=True, keep=len(ids), prompt=prompt_graph).logits[0]
    agreement = float(np.mean(ours[:-1].argmax(-1) == expected.top1[:-1]))
    quality = Quality(top1_agreement=round(agreement, 4), perplexity=round(_perplexity(ours, ids), 4),
                      reference_perplexity=round(expected.perplexity, 4), reference_dtype=expected.dtype)
    log.info("quality vs PyTorch %s (%s graph): top-1 agreement %.3f, perplexity %.3f (%s %.3f)", expected.dtype,
             "prompt" if prompt_graph else "decode", quality.top1_agreement, quality.perplexity, expected.dtype,
             quality.reference_perplexity)
    return quality


def _perplexity(logits: np.ndarray, ids: list[int]) -> float:
    shifted = logits[:-1] - logits[:-1].max(axis=-1, keepdims=True)
    logprobs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    picked = logprobs[np.arange(len(ids) - 1), ids[1:]]
    return float(np.exp(-picked.mean()))


EMBEDDING_TEXTS = [
    "The food was delicious and the waiter was friendly.",
    "ONNX Runtime executes models on many kinds of hardware.",
    "A short one.",
    # Longer than sentence-transformers' max_seq_length (256 tokens for all-MiniLM-L6-v2, below BERT's
    # 512 positions): catches a context_length that truncates differently from the reference.
    " ".join([QUALITY_TEXT] * 6),
]


def validate_embedding(folder: Path, manifest: Manifest, reference_folder: Path, tokenizer: Any) -> float:
    """Cosine between our vectors and sentence-transformers' own; returns the worst one."""
    from sentence_transformers import SentenceTransformer

    from fastllm.runtime.embedding import EmbeddingEngine

    reference = SentenceTransformer(str(reference_folder), device="cpu").encode(
        EMBEDDING_TEXTS, show_progress_bar=False
    )
    engine = EmbeddingEngine(folder, manifest, providers=["CPUExecutionProvider"])
    try:
        ids = [tokenizer(t, truncation=True, max_length=manifest.context_length)["input_ids"]
               for t in EMBEDDING_TEXTS]
        ours = engine.run_batch(ids)
    finally:
        engine.close()
    cosine = np.sum(ours * reference, axis=1) / (
        np.linalg.norm(ours, axis=1) * np.linalg.norm(reference, axis=1)
    )
    worst = float(cosine.min())
    log.info("validate: embeddings cosine vs sentence-transformers >= %.6f", worst)
    threshold = 0.999 if manifest.quantization == "none" and manifest.dtype == "fp32" else 0.98
    if worst < threshold:
        raise ExportError(f"validation failed: embedding cosine {worst:.5f} < {threshold}")
    return worst
