"""SentencePiece-BPE tokenizers (Gemma's) rebuilt from a GGUF vocabulary.

llama.cpp stores SentencePiece vocabularies as pieces, scores and types, without merges. transformers' GGUF
conversion reads Gemma's as a Unigram model over those scores, but Gemma's scores are BPE merge priorities,
not log-probabilities: words came out in pieces ("▁c ap it al" instead of the trained "▁capital"), so prompts
were not the token sequences the model was trained on. SentencePiece's BPE merges, at each step, the adjacent
pair whose joined piece has the highest score; a `tokenizers` BPE model whose merges are ranked by the joined
piece's score does the same. Control tokens (``<start_of_turn>``) and user-defined ones (runs of newlines,
markup) are matched whole before the model sees the text, as llama.cpp does.
"""

from __future__ import annotations

from typing import Any

# llama.cpp's token types (gguf.TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def sentencepiece_bpe(meta: dict[str, Any]) -> Any:
    """A ``tokenizers.Tokenizer`` equivalent to the SentencePiece BPE model in the GGUF metadata ``meta``."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE

    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    scores: list[float] = meta["tokenizer.ggml.scores"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    vocab = {token: index for index, token in enumerate(tokens)}
    ranked: list[tuple[float, int, int, str, str]] = []
    for index, token in enumerate(tokens):
        if types[index] != NORMAL:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[index], vocab[left], vocab[right], left, right))
    ranked.sort()
    unknown = meta.get("tokenizer.ggml.unknown_token_id")
    model = BPE(vocab=vocab, merges=[(left, right) for *_, left, right in ranked], byte_fallback=True,
                fuse_unk=True, unk_token=tokens[unknown] if unknown is not None else None)
    tokenizer = Tokenizer(model)
    normalize = [normalizers.Replace(" ", "▁")]
    if meta.get("tokenizer.ggml.add_space_prefix", False):
        normalize.insert(0, normalizers.Prepend("▁"))
    tokenizer.normalizer = normalizers.Sequence(normalize)
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.add_tokens([AddedToken(tokens[i], special=types[i] == CONTROL, normalized=False)
                          for i in range(len(tokens)) if types[i] in (CONTROL, USER_DEFINED)])
    return tokenizer
