"""One forward pass of an exported decoder graph (optimum's ``text-generation-with-past`` layout).

The same graph serves prefill (many new tokens, empty past) and decode (one new token per row). The
graph concatenates past and new keys/values itself, so ``present`` of one step is fed back unchanged
as ``past`` of the next: no copies on our side between steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fastllm.errors import ModelLoadError
from fastllm.manifest import Manifest
from fastllm.runtime.providers import create_session

_ORT_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


@dataclass
class StepOutput:
    logits: np.ndarray  # [batch, vocab] for the last position of each row, float32
    present: list[np.ndarray]  # per layer: key, value, key, value, ...


class Decoder:
    def __init__(self, folder: Path, manifest: Manifest, *, providers: Any = "auto",
                 provider_options: dict[str, dict[str, Any]] | None = None, threads: int = 0) -> None:
        onnx_path = folder / manifest.onnx_file
        if not onnx_path.is_file():
            raise ModelLoadError(f"{onnx_path} is missing; re-run `fastllm export`")
        loaded = create_session(onnx_path, requested=providers, provider_options=provider_options,
                                threads=threads)
        self.session = loaded.session
        self.provider = loaded.provider
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        self.present_names = [o.name for o in self.session.get_outputs() if o.name.startswith("present")]
        if not self.past_names or len(self.past_names) != len(self.present_names):
            raise ModelLoadError(f"{onnx_path} has no KV-cache inputs; export it with `fastllm export`")
        self._output_names = ["logits", *self.present_names]
        self.has_position_ids = "position_ids" in inputs
        first = inputs[self.past_names[0]]
        self.kv_dtype = _ORT_TO_NUMPY.get(first.type, np.float32)
        self.num_kv_heads = manifest.num_kv_heads or int(first.shape[1])
        self.head_dim = manifest.head_dim or int(first.shape[3])
        self.vocab_size = manifest.vocab_size
        # GroupQueryAttention graphs (ours, or a hub repo built by the GenAI builder) take no position_ids
        # and read each row's length from the mask: their batches are right-padded.
        self.right_padded = manifest.graph == "fused" or not self.has_position_ids

    def empty_past(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.num_kv_heads, 0, self.head_dim)
        return [np.zeros(shape, dtype=self.kv_dtype) for _ in self.past_names]

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                past: list[np.ndarray], *, all_logits: bool = False) -> StepOutput:
        """Run one step; ``attention_mask`` covers past and new tokens, 0 marks left padding."""
        feeds: dict[str, np.ndarray] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.has_position_ids:
            feeds["position_ids"] = position_ids
        feeds.update(zip(self.past_names, past, strict=True))
        outputs = self.session.run(self._output_names, feeds)
        logits = outputs[0]
        if not all_logits:
            logits = logits[:, -1, :]
        return StepOutput(logits=logits.astype(np.float32, copy=False), present=outputs[1:])
