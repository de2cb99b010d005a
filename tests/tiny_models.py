"""Tiny random checkpoints, one per supported architecture, built from transformers configs.

Each is a real `save_pretrained` folder (safetensors weights, config, generation config and a
`tokenizers`-built tokenizer with a chat template), small enough (hidden 64, 2 layers, ~400 tokens)
that exporting one takes seconds. Weights are seeded; `build()` caches the folders under
`.cache/test-assets/tiny-<hash of this file>/`, so every run of one version of this file sees the same
checkpoints (tokenizer training is not guaranteed bit-identical across `tokenizers` versions).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TINY_HASH = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:10]
TINY_ROOT = ROOT / ".cache" / "test-assets" / f"tiny-{TINY_HASH}"

CORPUS = [
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "What is the capital of France? Write a haiku about the sea.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "ONNX Runtime executes models on many kinds of hardware, from phones to servers.",
    "The food was delicious and the waiter was friendly. A short one.",
    "You are a helpful assistant. The user asks questions and the assistant answers them.",
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris.",
    "system user assistant hi hello world 0123456789",
]

# ChatML, the template SmolLM2 and Qwen2 use; `bos_token` is prepended where the model wants one.
CHAT_TEMPLATE = (
    "{% if add_bos %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

PAD, BOS, IM_START, IM_END = "<|pad|>", "<s>", "<|im_start|>", "<|im_end|>"


def chat_tokenizer(*, add_bos: bool) -> Any:
    """Byte-level BPE (any text encodes) with ChatML special tokens; `add_bos` adds `<s>` on encode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=[PAD, BOS, IM_START, IM_END], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    if add_bos:
        bos_id = tok.token_to_id(BOS)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
        )
    template = CHAT_TEMPLATE.replace("add_bos", "true" if add_bos else "false")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=IM_END, pad_token=PAD,
        additional_special_tokens=[IM_START], chat_template=template, model_max_length=256,
    )


def wordpiece_tokenizer() -> Any:
    """BERT-style WordPiece with [CLS] ... [SEP] around every encode."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials,
                                                              show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=128,
    )


def _common(tokenizer: Any) -> dict[str, Any]:
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        # Larger than the default 0.02 so that logits are far apart and greedy decoding is not decided
        # by rounding noise between PyTorch and ONNX Runtime.
        "initializer_range": 0.2,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _llama(tokenizer: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**_common(tokenizer), tie_word_embeddings=True)


def _llama3(tokenizer: Any) -> Any:
    from transformers import LlamaConfig

    # Llama 3.2 (1B, 3B): "llama3" RoPE scaling, which rescales the rotary frequencies band by band.
    return LlamaConfig(**_common(tokenizer), tie_word_embeddings=True, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})


def _mistral(tokenizer: Any) -> Any:
    from transformers import MistralConfig

    return MistralConfig(**_common(tokenizer), sliding_window=4096)


def _qwen2(tokenizer: Any) -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(**_common(tokenizer), tie_word_embeddings=True)


def _phi3(tokenizer: Any) -> Any:
    from transformers import Phi3Config

    # Phi3Config defaults pad_token_id to 32000, outside a small vocabulary: _common overrides it.
    return Phi3Config(**_common(tokenizer), original_max_position_embeddings=256)


def _phi4_mini(tokenizer: Any) -> Any:
    from transformers import Phi3Config

    # Phi-4-mini: rotary embedding on three quarters of each head, the vocabulary table tied to the lm_head.
    # Heads of 64 (GroupQueryAttention wants the rotary half-width, here 24, a multiple of 8; Phi-4-mini's is 48).
    return Phi3Config(**{**_common(tokenizer), "hidden_size": 256},
                      original_max_position_embeddings=256, partial_rotary_factor=0.75, tie_word_embeddings=True)


def _phi3_longrope(tokenizer: Any) -> Any:
    from transformers import Phi3Config

    # Phi-3-128k / Phi-3.5 style: rotary factors switch once a sequence exceeds 64 positions.
    head_dim = 16
    return Phi3Config(**_common(tokenizer), original_max_position_embeddings=64, rope_scaling={
        "type": "longrope", "short_factor": [1.0] * (head_dim // 2), "long_factor": [4.0] * (head_dim // 2),
    })


def _gemma(tokenizer: Any) -> Any:
    from transformers import GemmaConfig

    # Gemma's head_dim is its own setting (256 by default), not hidden_size // heads: 32 here, so the
    # manifest must read it from the config rather than divide.
    return GemmaConfig(**_common(tokenizer), head_dim=32)


def _gemma3(tokenizer: Any) -> Any:
    from transformers import Gemma3TextConfig

    # Sliding-window layers (every layer but each sixth) with a window shorter than the validation prompts.
    return Gemma3TextConfig(**_common(tokenizer), head_dim=16, sliding_window=16, query_pre_attn_scalar=16)


def _qwen3(tokenizer: Any) -> Any:
    from transformers import Qwen3Config

    return Qwen3Config(**_common(tokenizer), head_dim=16, tie_word_embeddings=True)


def _granite(tokenizer: Any) -> Any:
    from transformers import GraniteConfig

    # Granite scales embeddings, residuals, attention and logits by its own multipliers.
    return GraniteConfig(**_common(tokenizer), embedding_multiplier=2.0, logits_scaling=4.0, residual_multiplier=0.5,
                         attention_multiplier=0.25, tie_word_embeddings=True)


def _smollm3(tokenizer: Any) -> Any:
    from transformers import SmolLM3Config

    return SmolLM3Config(**_common(tokenizer), tie_word_embeddings=True)


# name -> (config factory, whether the tokenizer adds a BOS, expected model_type, architecture class)
CAUSAL: dict[str, tuple[Callable[[Any], Any], bool, str, str]] = {
    "llama": (_llama, True, "llama", "LlamaForCausalLM"),
    "llama3": (_llama3, True, "llama", "LlamaForCausalLM"),
    "mistral": (_mistral, False, "mistral", "MistralForCausalLM"),
    "qwen2": (_qwen2, False, "qwen2", "Qwen2ForCausalLM"),
    "phi3": (_phi3, False, "phi3", "Phi3ForCausalLM"),
    "phi3-longrope": (_phi3_longrope, False, "phi3", "Phi3ForCausalLM"),
    "phi4-mini": (_phi4_mini, False, "phi3", "Phi3ForCausalLM"),
    "gemma": (_gemma, True, "gemma", "GemmaForCausalLM"),
    "gemma3": (_gemma3, True, "gemma3_text", "Gemma3ForCausalLM"),
    "qwen3": (_qwen3, False, "qwen3", "Qwen3ForCausalLM"),
    "granite": (_granite, False, "granite", "GraniteForCausalLM"),
    "smollm3": (_smollm3, False, "smollm3", "SmolLM3ForCausalLM"),
}

# sentence-transformers truncates inputs to this, below the embedders' 128 positions.
MAX_SEQ_LENGTH = 64

EMBEDDERS: dict[str, dict[str, Any]] = {
    "bert-mean": {"pooling": "mean", "normalize": True},
    "bert-cls": {"pooling": "cls", "normalize": False},
}


def build_causal(name: str, folder: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    factory, add_bos, _, _ = CAUSAL[name]
    tokenizer = chat_tokenizer(add_bos=add_bos)
    config = factory(tokenizer)
    config.architectures = [CAUSAL[name][3]]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_embedder(name: str, folder: Path) -> Path:
    import torch
    from transformers import BertConfig, BertModel

    spec = EMBEDDERS[name]
    tokenizer = wordpiece_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=128, initializer_range=0.2,
        pad_token_id=tokenizer.pad_token_id, architectures=["BertModel"],
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if spec["normalize"]:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (folder / "2_Normalize").mkdir()
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    # Shorter than the 128 positions: sentence-transformers truncates here, so exports must too.
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": MAX_SEQ_LENGTH,
                                                                  "do_lower_case": False}))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 64,
        "pooling_mode_cls_token": spec["pooling"] == "cls",
        "pooling_mode_mean_tokens": spec["pooling"] == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }, indent=2))
    return folder


def build_unsupported(folder: Path) -> Path:
    """A tiny GPT-2: optimum can export it, FastLLM does not list it."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=300, n_embd=32, n_layer=1, n_head=2, n_positions=64,
                        architectures=["GPT2LMHeadModel"])
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def build(name: str) -> Path:
    """The checkpoint folder for `name` (a key of CAUSAL or EMBEDDERS, or "gpt2"), built once."""
    folder = TINY_ROOT / name
    if (folder / ".complete").exists():
        return folder
    staging = TINY_ROOT / f".{name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    if name in CAUSAL:
        build_causal(name, staging)
    elif name in EMBEDDERS:
        build_embedder(name, staging)
    elif name == "gpt2":
        build_unsupported(staging)
    else:
        raise KeyError(name)
    (staging / ".complete").touch()
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder
