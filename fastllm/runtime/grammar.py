"""Constrained decoding with llguidance: a grammar per request, compiled once, masking each row's logits.

JSON schemas, regular expressions, Lark grammars and tool-call syntaxes all reach the engine as one
thing, an llguidance grammar (``Grammar``). The model's ``GrammarCompiler`` builds llguidance's
tokenizer from the export's ``tokenizer.json`` once, compiles each distinct grammar once (an LRU of
pristine matchers) and hands every sequence its own copy. In the engine step the copy is a logits
processor like penalties and bias: it masks the tokens the grammar forbids in that row alone, so
constrained and free rows share one batch, and it learns each sampled token.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fastllm.errors import InvalidRequestError, MissingExtraError

log = logging.getLogger(__name__)

# JSON as models write it on one line (`{"a": 1, "b": [2, 3]}`): no free whitespace, which small models at
# high temperature would otherwise spend their whole token budget on. A schema's own "x-guidance" wins.
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}


@dataclass(frozen=True)
class Grammar:
    """An llguidance grammar (its JSON form) and the request field it came from, which errors name."""

    text: str
    param: str


def json_schema_grammar(schema: dict[str, Any] | bool, param: str) -> Grammar:
    llg = _llguidance()
    try:
        return Grammar(llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS), param)
    except (ValueError, TypeError) as exc:
        raise InvalidRequestError(f"{param} is not a usable JSON schema: {exc}", param=param) from None


def lark_grammar(lark: str, param: str) -> Grammar:
    """A Lark grammar in llguidance's dialect (``%json {...}`` for inline schemas; GBNF is converted)."""
    llg = _llguidance()
    try:
        lark = llg.grammar_from("grammar", lark)
    except ValueError as exc:
        raise InvalidRequestError(f"{param} is not a valid grammar: {exc}", param=param) from None
    return Grammar(json.dumps({"grammars": [{"lark_grammar": lark}]}), param)


def regex_grammar(regex: str, param: str) -> Grammar:
    return Grammar(_llguidance().LLMatcher.grammar_from_regex(regex), param)


class CompiledGrammar:
    """A grammar checked against the model's tokenizer; ``matcher()`` starts a sequence on it."""

    def __init__(self, pristine: Any) -> None:
        self._pristine = pristine

    def matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self._pristine.deep_copy())


class GrammarMatcher:
    """One sequence's place in its grammar, applied to its logits beside penalties and bias."""

    def __init__(self, matcher: Any) -> None:
        self._matcher = matcher
        self._next: Future[bytes] | None = None

    def prefetch(self, pool: Executor) -> None:
        """Start computing the next mask in ``pool``: the engine does this before the model's step, so the
        grammar works while ONNX Runtime does (it releases the GIL) instead of after it."""
        self._next = pool.submit(self._matcher.compute_bitmask)

    def mask(self, scores: np.ndarray) -> np.ndarray:
        """``scores`` with every token the grammar forbids next at -inf (a new array)."""
        ready, self._next = self._next, None
        bits = np.frombuffer(ready.result() if ready is not None else self._matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, count=scores.shape[-1], bitorder="little").view(bool)
        if not allowed.any():
            raise GrammarViolation(f"the grammar allows no token: {self._matcher.get_error() or 'dead end'}")
        return np.where(allowed, scores, -np.inf)

    def accept(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise GrammarViolation(f"token {token} broke the grammar: {self._matcher.get_error()}")

    @property
    def done(self) -> bool:
        """The grammar is complete and allows nothing more: the sequence ends here with ``stop``."""
        return bool(self._matcher.is_stopped())


class GrammarViolation(RuntimeError):
    """A sampled token the grammar refused: a bug in masking, never a client's fault."""


class GrammarCompiler:
    """Per model: llguidance's tokenizer (built on first use, about a second for a large vocabulary) and
    an LRU of compiled grammars, so a schema sent again costs nothing before its first token."""

    def __init__(self, tokenizer_json: Path, *, vocab_size: int, eos_token_ids: Sequence[int],
                 cache_size: int = 128) -> None:
        self._tokenizer_json = tokenizer_json
        self._vocab_size = vocab_size
        self._eos = list(eos_token_ids)
        self._cache: OrderedDict[str, CompiledGrammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._tokenizer: Any = None
        self.compiled = 0  # grammars compiled (cache misses), for /metrics
        self.hits = 0

    def tokenizer(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                llg = _llguidance()
                started = time.perf_counter()
                source = _for_llguidance(json.loads(self._tokenizer_json.read_text()))
                self._tokenizer = llg.LLTokenizer(json.dumps(source), n_vocab=self._vocab_size,
                                                  eos_token=self._eos or None)
                log.info("llguidance tokenizer for %s built in %.0f ms", self._tokenizer_json.parent.name,
                         (time.perf_counter() - started) * 1000)
            return self._tokenizer

    def compile(self, grammar: Grammar) -> CompiledGrammar:
        """The compiled grammar, from the cache when this exact grammar was seen before. Blocking (up to
        a second for a large schema, with the GIL released): call it from a worker thread."""
        with self._lock:
            cached = self._cache.get(grammar.text)
            if cached is not None:
                self._cache.move_to_end(grammar.text)
                self.hits += 1
                return cached
        llg = _llguidance()
        tokenizer = self.tokenizer()
        started = time.perf_counter()
        matcher = llg.LLMatcher(tokenizer, grammar.text, log_level=0)
        if matcher.is_error():
            raise InvalidRequestError(f"{grammar.param} cannot be enforced: {_first_line(matcher.get_error())}",
                                      param=grammar.param)
        compiled = CompiledGrammar(matcher)
        log.info("compiled a new grammar for %s in %.1f ms (%d bytes)", grammar.param,
                 (time.perf_counter() - started) * 1000, len(grammar.text))
        with self._lock:
            self.compiled += 1
            self._cache[grammar.text] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled


def _for_llguidance(tokenizer: dict[str, Any]) -> dict[str, Any]:
    """The tokenizer as llguidance must see it, where its reading of ``tokenizer.json`` differs from `tokenizers`.

    - llguidance takes every added token for a special one, which text cannot match: Qwen2.5's `<tool_call>`
      (added, but not special) could then never open a call. Where such a token is in the vocabulary, its
      copy drops it from the added tokens, so it is the text it stands for.
    - transformers' GGUF conversion gives byte-level BPE vocabularies (SmolLM2, Qwen2.5) a decoder that chains
      sentencepiece's ByteFallback before ByteLevel. llguidance reads the first step and takes the vocabulary
      for sentencepiece's, so every "Ġ" and "Ċ" would be the wrong bytes: its copy gets the plain ByteLevel
      decoder the pre-tokenizer implies.
    """
    vocab = (tokenizer.get("model") or {}).get("vocab")
    if isinstance(vocab, dict):
        tokenizer["added_tokens"] = [t for t in tokenizer.get("added_tokens", [])
                                     if t.get("special", True) or vocab.get(t.get("content")) != t.get("id")]
    pre = tokenizer.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    decoder = tokenizer.get("decoder") or {}
    if decoder.get("type") == "Sequence" and any(step.get("type") == "ByteLevel" for step in steps):
        byte_level = [d for d in decoder.get("decoders", []) if d.get("type") == "ByteLevel"]
        if byte_level:
            tokenizer["decoder"] = byte_level[0]
            tokenizer.get("model", {})["byte_fallback"] = False
    return tokenizer


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "the grammar is invalid"


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError:
        raise MissingExtraError("serve", "llguidance") from None
    return llguidance
