"""FastLLM: export HuggingFace models to ONNX once, serve them fast with ONNX Runtime."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fastllm")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0"
