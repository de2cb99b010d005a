"""Turn SOURCE (hub id, local folder or .gguf file) into a loaded PyTorch model and tokenizer.

GGUF files go through transformers' GGUF loader, whose tokenizer conversion gets special tokens
wrong for some models (SmolLM2: eos became ``<|im_start|>``, a BOS was prepended to every encode,
no pad token). The GGUF's own metadata is the truth, so we re-apply it after loading.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fastllm import hub
from fastllm.errors import CorruptModelError, SourceNotFoundError, UnsupportedModelError
from fastllm.export.architectures import SUPPORTED, supported_list

log = logging.getLogger(__name__)

# Files a checkpoint needs; skips other frameworks' weights and ONNX/GGUF duplicates on the hub.
CHECKPOINT_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.model",
    "*.txt",
    "*.jinja",
    "*.py",
    "1_Pooling/*",
    "2_Normalize/*",
]
# Duplicates of the transformers weights some repos carry: Mistral's consolidated.safetensors (the
# whole model again, for mistral-inference), Llama's original/ folder, exported ONNX/OpenVINO copies.
CHECKPOINT_IGNORE = ["consolidated*", "original/*", "onnx/*", "openvino/*"]
LEGACY_WEIGHT_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
_QUANT_SUFFIX = re.compile(r"[.-](q\d\w*|f16|f32|bf16|fp16|fp32)$", re.IGNORECASE)


@dataclass
class Checkpoint:
    """A resolved source: where its files are and what it is, before any weights are loaded."""

    source: str
    name: str
    folder: Path
    revision: str | None = None
    gguf_file: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    task: str = "text-generation"
    pooling: str | None = None
    normalize: bool = False
    # Embedding models: the longest input sentence-transformers feeds the model (sentence_bert_config.json).
    max_seq_length: int | None = None
    # Hub sources: the commit the revision resolved to (the snapshot folder's name).
    commit: str | None = None

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", "unknown"))


def resolve(source: str, *, revision: str | None, token: str | None, task: str) -> Checkpoint:
    path = Path(source).expanduser()
    if path.suffix == ".gguf" or _is_gguf(path):
        if not path.is_file():
            raise SourceNotFoundError(f"GGUF file not found: {path}")
        checkpoint = Checkpoint(
            source=str(path.resolve()),
            name=_gguf_name(path),
            folder=path.parent,
            gguf_file=path.name,
            config=_gguf_config(path),
        )
    elif path.is_dir():
        checkpoint = Checkpoint(
            source=str(path.resolve()), name=path.resolve().name, folder=path, config=_read_config(path)
        )
    elif hub.looks_like_repo_id(source):
        folder = hub.download(source, revision=revision, token=token, allow_patterns=CHECKPOINT_PATTERNS,
                              ignore_patterns=CHECKPOINT_IGNORE)
        if not any(folder.glob("*.safetensors")):
            # Older repos only have PyTorch pickles; fetched only then, as they duplicate safetensors.
            folder = hub.download(source, revision=revision, token=token, allow_patterns=LEGACY_WEIGHT_PATTERNS)
        checkpoint = Checkpoint(
            source=source, name=source, folder=folder, revision=revision, config=_read_config(folder),
            commit=folder.name,
        )
    else:
        raise SourceNotFoundError(
            f"{source!r} is neither a local folder, a .gguf file, nor a hub id of the form org/name"
        )
    _classify(checkpoint, task)
    return checkpoint


def _is_gguf(path: Path) -> bool:
    """A GGUF file without the suffix, by its magic: Ollama stores models as blobs named sha256-<hex>."""
    try:
        with path.open("rb") as file:
            return path.is_file() and file.read(4) == b"GGUF"
    except OSError:
        return False


# File names that say nothing of the model: Ollama's blobs (sha256-<hex>), bare hashes, converters' defaults.
_GENERIC_STEM = re.compile(r"(sha256[-_:]?)?[0-9a-f]{12,}|model|ggml-model(-\w+)?|unnamed|output", re.IGNORECASE)


def _gguf_name(path: Path) -> str:
    """The served name of a GGUF: its file name without the quantization suffix, as published GGUFs are named
    (Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf); the file's own ``general.name`` only where the file name is a
    hash or a default. ``general.name`` is not first because converters fill it carelessly: PyPI's Qwen2.5-Coder
    files say "... Instruct AWQ" and "... Instruct GGUF", SmolLM2's "Smollm2 135M 8k Lc100K Mix1 Ep2"."""
    stem = _QUANT_SUFFIX.sub("", path.stem)
    if not _GENERIC_STEM.fullmatch(stem):
        return stem
    title = str(read_gguf_metadata(path).get("general.name") or "").strip()
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", title).strip("-.")
    return slug or stem


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise SourceNotFoundError(f"{folder} has no config.json; it is not a transformers checkpoint") from None
    except json.JSONDecodeError as exc:
        raise CorruptModelError(f"{folder / 'config.json'} is not valid JSON: {exc}") from None


# GGUF architecture names that transformers loads as another model type: Gemma 3's text models (270M, 1B, and
# the language part of the larger ones) are gemma3_text, as transformers' GGUF loader maps them.
_GGUF_MODEL_TYPES = {"gemma3": "gemma3_text"}


def _gguf_config(path: Path) -> dict[str, Any]:
    architecture = read_gguf_metadata(path)["general.architecture"]
    return {"model_type": _GGUF_MODEL_TYPES.get(architecture, architecture)}


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """The GGUF key/value table, without the tensors.

    Parsing the file costs seconds (5 s for Qwen2.5-1.5B), and an export needs it several times (resolve, the
    memory check, the tokenizer fix), so it is read once per file version.
    """
    return _read_gguf(*_file_version(path))[0]


def gguf_parameter_count(path: Path) -> int:
    """How many weights the GGUF's tensors hold, from the same single read as its metadata."""
    return _read_gguf(*_file_version(path))[1]


def _file_version(path: Path) -> tuple[Path, int, int]:
    path = Path(path).resolve()
    stat = path.stat()
    return path, stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=4)
def _read_gguf(path: Path, mtime_ns: int, size: int) -> tuple[dict[str, Any], int]:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
        meta = {key: value.contents() for key, value in reader.fields.items()}
        parameters = sum(int(tensor.n_elements) for tensor in reader.tensors)
    except Exception as exc:  # gguf raises ValueError, IndexError, struct errors... on damaged files
        raise CorruptModelError(f"{path} is not a readable GGUF file: {exc}") from None
    if "general.architecture" not in meta:
        raise CorruptModelError(f"{path} is a GGUF file without general.architecture; it is not a model")
    return meta, parameters


def _classify(checkpoint: Checkpoint, task: str) -> None:
    model_type = checkpoint.model_type
    modules = checkpoint.folder / "modules.json"
    if task == "auto":
        if modules.is_file() or (SUPPORTED.get(model_type, None) and SUPPORTED[model_type].task == "embedding"):
            task = "embedding"
        else:
            task = "text-generation"
    checkpoint.task = task
    arch = SUPPORTED.get(model_type)
    if arch is None or arch.task != task:
        raise UnsupportedModelError(
            f"{checkpoint.source}: architecture {model_type!r} is not supported for {task}. "
            f"Supported: {supported_list()}"
        )
    if task == "embedding":
        checkpoint.pooling, checkpoint.normalize = _sentence_transformers_pooling(checkpoint.folder)
        checkpoint.max_seq_length = _sentence_transformers_max_length(checkpoint.folder)


def _sentence_transformers_pooling(folder: Path) -> tuple[str, bool]:
    """Pooling mode and normalisation as the model's own sentence-transformers modules declare them."""
    pooling, normalize = "mean", False
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return pooling, normalize
    for module in json.loads(modules_file.read_text()):
        kind = module.get("type", "")
        if kind.endswith("Normalize"):
            normalize = True
        elif kind.endswith("Pooling"):
            config_file = folder / module.get("path", "1_Pooling") / "config.json"
            if config_file.is_file():
                config = json.loads(config_file.read_text())
                if config.get("pooling_mode_cls_token"):
                    pooling = "cls"
                elif config.get("pooling_mode_lasttoken"):
                    pooling = "last"
                elif config.get("pooling_mode_mean_tokens"):
                    pooling = "mean"
                else:
                    raise UnsupportedModelError(f"{config_file}: only mean, cls and last-token pooling are supported")
    return pooling, normalize


def _sentence_transformers_max_length(folder: Path) -> int | None:
    """sentence-transformers truncates inputs here (256 for all-MiniLM-L6-v2, below BERT's 512)."""
    config_file = folder / "sentence_bert_config.json"
    if not config_file.is_file():
        return None
    try:
        value = json.loads(config_file.read_text()).get("max_seq_length")
    except json.JSONDecodeError as exc:
        raise CorruptModelError(f"{config_file} is not valid JSON: {exc}") from None
    return int(value) if isinstance(value, int) and value > 0 else None


def load(checkpoint: Checkpoint, *, trust_remote_code: bool, dtype: str = "fp32") -> tuple[Any, Any]:
    """Load the PyTorch model (fp32, or fp16 where the export only needs half precision: see
    `pipeline.working_dtype`) and its tokenizer (fixed up from GGUF metadata where needed)."""
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    gguf = checkpoint.folder / checkpoint.gguf_file if checkpoint.gguf_file else None
    if gguf:
        kwargs["gguf_file"] = checkpoint.gguf_file
    try:
        model = load_model(checkpoint.folder, task=checkpoint.task, dtype=dtype, **kwargs)
        tokenizer = (gguf and _sentencepiece_bpe_tokenizer(gguf)) or AutoTokenizer.from_pretrained(
            checkpoint.folder, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise CorruptModelError(f"cannot load {checkpoint.source}: {exc}") from None
    if gguf:
        _apply_gguf_tokenizer_metadata(gguf, model, tokenizer)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if checkpoint.max_seq_length and not 0 < tokenizer.model_max_length <= checkpoint.max_seq_length:
        tokenizer.model_max_length = checkpoint.max_seq_length
    return model, tokenizer


def load_model(folder: Path, *, task: str, dtype: str = "fp32", **kwargs: Any) -> Any:
    """The PyTorch model of a source folder (``gguf_file`` in ``kwargs`` for a GGUF), at ``dtype``."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    model_class = AutoModelForCausalLM if task == "text-generation" else AutoModel
    with _dequantized_as(np.float16 if dtype == "fp16" else None):
        model = model_class.from_pretrained(folder, dtype=torch_dtype, **kwargs)
    model.eval()
    return model


@contextlib.contextmanager
def _dequantized_as(dtype: Any) -> Iterator[None]:
    """transformers dequantizes every GGUF tensor to fp32 and holds them all before it builds the model: for a
    half-precision model that state dict alone is twice the model. Casting each tensor as it is dequantized
    keeps it at the model's size."""
    import gguf

    original = gguf.dequantize
    if dtype is not None:
        gguf.dequantize = lambda data, qtype: original(data, qtype).astype(dtype, copy=False)
    try:
        yield
    finally:
        gguf.dequantize = original


def _sentencepiece_bpe_tokenizer(path: Path) -> Any:
    """Our tokenizer for GGUF vocabularies that transformers converts wrongly, else None: SentencePiece BPE
    without merges (Gemma's), which it reads as Unigram (see export.gguf_vocab). Decided before transformers'
    conversion runs, which alone takes 20 s for Gemma's 262k pieces."""
    meta = read_gguf_metadata(path)
    if meta.get("tokenizer.ggml.model") != "llama" or "tokenizer.ggml.merges" in meta or \
            not str(meta["general.architecture"]).startswith("gemma"):
        return None
    from transformers import PreTrainedTokenizerFast

    from fastllm.export.gguf_vocab import sentencepiece_bpe

    log.info("tokenizer rebuilt as SentencePiece BPE from the GGUF's pieces and scores")
    unknown = meta.get("tokenizer.ggml.unknown_token_id")
    return PreTrainedTokenizerFast(tokenizer_object=sentencepiece_bpe(meta),
                                   unk_token=None if unknown is None else meta["tokenizer.ggml.tokens"][unknown])


def _apply_gguf_tokenizer_metadata(path: Path, model: Any, tokenizer: Any) -> None:
    meta = read_gguf_metadata(path)
    tokens: list[str] = meta["tokenizer.ggml.tokens"]

    def token(key: str) -> tuple[int, str] | None:
        index = meta.get(f"tokenizer.ggml.{key}_token_id")
        return (int(index), tokens[int(index)]) if index is not None and int(index) < len(tokens) else None

    if eos := token("eos"):
        tokenizer.eos_token = eos[1]
        model.config.eos_token_id = eos[0]
        model.generation_config.eos_token_id = eos[0]
    if bos := token("bos"):
        tokenizer.bos_token = bos[1]
        model.config.bos_token_id = bos[0]
        model.generation_config.bos_token_id = bos[0]
    if pad := token("padding"):
        tokenizer.pad_token = pad[1]
        model.config.pad_token_id = pad[0]
        model.generation_config.pad_token_id = pad[0]
    if "tokenizer.ggml.add_bos_token" in meta and hasattr(tokenizer, "add_bos_token"):
        tokenizer.add_bos_token = bool(meta["tokenizer.ggml.add_bos_token"])
    if "tokenizer.ggml.add_eos_token" in meta and hasattr(tokenizer, "add_eos_token"):
        tokenizer.add_eos_token = bool(meta["tokenizer.ggml.add_eos_token"])
    if "tokenizer.ggml.add_bos_token" in meta and bos:
        _make_encode_add_bos(tokenizer, bool(meta["tokenizer.ggml.add_bos_token"]), bos)
    if template := meta.get("tokenizer.chat_template"):
        tokenizer.chat_template = template
    if meta.get("tokenizer.ggml.model") == "gpt2":
        _add_marker_tokens(tokenizer, tokens, meta.get("tokenizer.ggml.token_type") or [])
    log.info("tokenizer special tokens taken from GGUF metadata: eos=%s bos=%s", eos, bos)


# llama.cpp's token types: CONTROL tokens are special, USER_DEFINED ones are plain text matched whole.
_CONTROL, _USER_DEFINED = 3, 4


def _add_marker_tokens(tokenizer: Any, tokens: list[str], types: list[int]) -> None:
    """Keep the GGUF's marker tokens whole. transformers' conversion of byte-level vocabularies makes added
    tokens of only a few control tokens, so Qwen2.5's `<tool_call>` text in a prompt became four ordinary
    pieces instead of the one token the model was trained on. Each one keeps its id (it is in the vocabulary)."""
    from tokenizers import AddedToken

    known = set(tokenizer.get_added_vocab())
    markers = [
        AddedToken(tokens[i], special=kind == _CONTROL, normalized=False)
        for i, kind in enumerate(types) if kind in (_CONTROL, _USER_DEFINED) and tokens[i] not in known
    ]
    if markers:
        tokenizer.add_tokens(markers)
        log.info("kept %d GGUF marker tokens whole: %s", len(markers),
                 ", ".join(str(m.content) for m in markers[:8]) + (" ..." if len(markers) > 8 else ""))


def _make_encode_add_bos(tokenizer: Any, add: bool, bos: tuple[int, str]) -> None:
    """Make ``tokenizer.json`` itself (what serve reads) prepend BOS exactly when the GGUF says so.

    Tokenizer classes with an ``add_bos_token`` property rebuild their post-processor from it; the
    others keep whatever the GGUF conversion produced, so check the encoding and rewrite it if needed.
    """
    from tokenizers import processors

    probe = tokenizer.backend_tokenizer.encode("a").ids
    adds = bool(probe) and probe[0] == bos[0]
    if adds == add:
        return
    if add:
        template = processors.TemplateProcessing(
            single=f"{bos[1]} $A", pair=f"{bos[1]} $A {bos[1]} $B:1", special_tokens=[(bos[1], bos[0])]
        )
    else:
        template = processors.TemplateProcessing(single="$A", pair="$A $B:1", special_tokens=[])
    tokenizer.backend_tokenizer.post_processor = template
    log.info("tokenizer post-processor rewritten: %s BOS on encode, as the GGUF declares",
             "adds" if add else "no")
