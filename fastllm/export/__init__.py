"""Export checkpoints to ONNX (needs the `export` extra: torch, transformers, optimum)."""
