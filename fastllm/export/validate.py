"""Check an export against its PyTorch model before it is allowed to exist.

fp32 must reproduce PyTorch's greedy tokens exactly; quantized graphs are measured instead
(teacher-forced top-1 agreement and perplexity on a fixed text) and the figures go into the manifest,
so users choose a quantization by evidence.
"""

from __future__ import annotations

import logging
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


def check_greedy(folder: Path, manifest: Manifest, model: Any, tokenizer: Any) -> None:
    """fp32 graphs must reproduce PyTorch's greedy tokens; every graph's answers are logged."""
    import torch

    decoder = Decoder(folder, manifest, providers=["CPUExecutionProvider"])
    eos = set(manifest.eos_token_ids)
    exact = manifest.dtype == "fp32" and manifest.quantization == "none"
    for messages in PROMPTS:
        prompt = _prompt_ids(tokenizer, messages)
        input_ids = torch.tensor([prompt])
        with torch.no_grad():
            generated = model.generate(
                input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=GREEDY_TOKENS,
                do_sample=False, eos_token_id=list(eos) or None, pad_token_id=manifest.pad_token_id,
            )
        reference = generated[0, len(prompt):].tolist()
        ours = greedy_onnx(decoder, prompt, GREEDY_TOKENS, eos)
        answer = tokenizer.decode(ours, skip_special_tokens=True)
        log.info("validate: %r -> %r", messages[-1]["content"], answer)
        if exact and ours != reference:
            raise ExportError(
                "validation failed: ONNX Runtime's greedy tokens differ from PyTorch's for "
                f"{messages[-1]['content']!r}:\n  onnx:    {ours}\n  pytorch: {reference}"
            )


def measure_quality(folder: Path, manifest: Manifest, model: Any, tokenizer: Any) -> None:
    """Teacher-forced agreement and perplexity against PyTorch; needs the graph's logits at every position,
    so it runs before the export keeps only the last position's."""
    decoder = Decoder(folder, manifest, providers=["CPUExecutionProvider"])
    manifest.quality = _quality(decoder, model, tokenizer)
    reference = manifest.quality.reference_dtype
    log.info("quality vs PyTorch %s: top-1 agreement %.3f, perplexity %.3f (%s %.3f)", reference,
             manifest.quality.top1_agreement, manifest.quality.perplexity, reference,
             manifest.quality.reference_perplexity)


def _quality(decoder: Decoder, model: Any, tokenizer: Any) -> Quality:
    import torch

    ids = tokenizer(QUALITY_TEXT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0].float().numpy()
    batch = np.asarray([ids], dtype=np.int64)
    ours = decoder.forward(batch, np.ones_like(batch), np.arange(len(ids))[None, :], decoder.empty_past(1),
                           all_logits=True).logits[0]
    agreement = float(np.mean(ours[:-1].argmax(-1) == reference[:-1].argmax(-1)))
    return Quality(top1_agreement=round(agreement, 4), perplexity=round(_perplexity(ours, ids), 4),
                   reference_perplexity=round(_perplexity(reference, ids), 4),
                   reference_dtype={torch.float16: "fp16", torch.bfloat16: "bf16"}.get(model.dtype, "fp32"))


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
