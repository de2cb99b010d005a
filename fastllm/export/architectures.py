"""What we export, declared as data: one row per transformers ``model_type``.

Adding an architecture means adding a row here and a tiny random config in the tests, not a branch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    model_type: str
    task: str  # "text-generation" or "embedding"
    examples: str


SUPPORTED: dict[str, Architecture] = {
    arch.model_type: arch
    for arch in (
        Architecture("llama", "text-generation", "TinyLlama-1.1B-Chat, SmolLM2, Llama 3"),
        Architecture("mistral", "text-generation", "Mistral-7B and derivatives"),
        Architecture("qwen2", "text-generation", "Qwen2, Qwen2.5, DeepSeek-R1-Distill-Qwen"),
        Architecture("phi3", "text-generation", "Phi-3"),
        Architecture("gemma", "text-generation", "Gemma"),
        Architecture("gemma3_text", "text-generation", "Gemma 3 text models (sliding-window layers)"),
        Architecture("qwen3", "text-generation", "Qwen3"),
        Architecture("granite", "text-generation", "Granite 3"),
        Architecture("smollm3", "text-generation", "SmolLM3"),
        Architecture("bert", "embedding", "all-MiniLM-L6-v2 and BERT sentence embedders"),
        Architecture("xlm-roberta", "embedding", "multilingual sentence embedders"),
        Architecture("mpnet", "embedding", "all-mpnet-base-v2"),
    )
}


def supported_list() -> str:
    return ", ".join(f"{a.model_type} ({a.examples})" for a in SUPPORTED.values())
