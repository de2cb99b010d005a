"""One forward pass of an exported decoder graph (optimum's ``text-generation-with-past`` layout).

The same graph serves prefill (many new tokens, empty past) and decode (one new token per row), except where
the export has a prompt graph (export/prefill_graph.py), which then reads prompts on the CPU. The
graph concatenates past and new keys/values itself, so ``present`` of one step is fed back unchanged
as ``past`` of the next: no copies on our side between steps.

On a GPU the step runs through IOBinding: ``present`` stays on the device as OrtValues and goes back in
as the next ``past`` without a round trip through host memory; only the logits come to the host. The
batch cache brings the KV to the host only when rows join or leave. Fused graphs on the CPU bind one
buffer as both past and present instead, and attention writes the new keys/values into it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from fastllm.errors import ModelLoadError
from fastllm.manifest import LOGITS_TO_KEEP, Manifest
from fastllm.runtime.providers import create_session, memory_bytes, physical_cores

log = logging.getLogger(__name__)

# Where a provider keeps its outputs when bound: IOBinding device names.
_DEVICES = {"CUDAExecutionProvider": "cuda", "ROCMExecutionProvider": "cuda", "DmlExecutionProvider": "dml"}

KV = Any  # np.ndarray on the host, or onnxruntime.OrtValue on the device between decode steps

# Tokens per piece when a long prompt is read in place on the CPU (see Decoder.prefill_after).
PROMPT_PIECE = 256

# ``beside="auto"`` loads the second pair of sessions where the graphs' files take at most this share of the
# memory: they hold about as much again (SmolLM2-135M int4, 210 MB of files: the server 696 instead of 407 MiB;
# Qwen2.5-Coder-0.5B, 757 MB: 2.1 instead of 1.1 GiB). On 24 GB, models up to about 1.5B at int4 with their int8
# prompt graph; a 7B's 11 GB would not be doubled.
BESIDE_MEMORY_SHARE = 1 / 8

# ``one_row_drift`` above this: a row's answer alone and in a batch may differ well away from any near-tie.
ROUNDING = 1e-3

_ORT_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


@dataclass
class _SharedBinding:
    """A binding kept across decode steps while the cache keeps its buffers: rebinding 60 buffers and the
    logits every step cost about 1.5 ms of a 12 ms step (SmolLM2 int4, 2 cores)."""

    past: list[KV]  # the cache's list of buffers; a new list means they were reallocated or moved
    binding: ort.IOBinding
    logits: np.ndarray  # [batch, 1, vocab], overwritten by every step (empty where ONNX Runtime allocates them)


@dataclass
class StepOutput:
    logits: np.ndarray  # [batch, vocab] for the last position of each row, float32
    present: list[KV]  # per layer: key, value, key, value, ...


class Decoder:
    def __init__(self, folder: Path, manifest: Manifest, *, providers: Any = "auto",
                 provider_options: dict[str, dict[str, Any]] | None = None, threads: int = 0,
                 io_binding: str = "auto", spinning: bool = True, prefill_graph: bool = True,
                 beside: bool | str = False) -> None:
        onnx_path = folder / manifest.onnx_file
        if not onnx_path.is_file():
            raise ModelLoadError(f"{onnx_path} is missing; re-run `fastllm export`")
        prefill_path = folder / manifest.prefill_file if prefill_graph and manifest.prefill_file else None
        if prefill_path is not None and not prefill_path.is_file():
            raise ModelLoadError(f"{prefill_path} is missing; re-run `fastllm export`")
        loaded = create_session(onnx_path, requested=providers, provider_options=provider_options,
                                threads=threads, spinning=spinning, spin_after_run=prefill_path is None)
        self.session = loaded.session
        self.provider = loaded.provider
        # Prompts (prefill, chunks, a cached prefix's remainder) run through the export's prompt graph where it
        # has one: int8 integer GEMMs, which only the CPU provider runs fast; decode steps through the main one.
        self.prompt_session = self.session
        if prefill_path is not None and self.provider == "CPUExecutionProvider":
            self.prompt_session = create_session(prefill_path, requested=["CPUExecutionProvider"],
                                                 threads=threads, spinning=spinning, spin_after_run=False).session
        # Its keys and values, another quantization's, differ from what a decode step computes for the same
        # tokens, so the prefix cache keeps only what prompts computed (see GenerationEngine._retain).
        self.has_prefill_graph = self.prompt_session is not self.session
        # ``beside``: the same graphs again on half the threads each, for a prompt read in a thread of its own
        # while decode steps go on (see GenerationEngine._read_beside), so that each owns its cores; "auto": where
        # the memory allows (BESIDE_MEMORY_SHARE)
        self.beside_sessions: tuple[ort.InferenceSession, ort.InferenceSession] | None = None
        half = (threads or physical_cores()) // 2
        if half and self.provider == "CPUExecutionProvider" and (
                _fits_beside([onnx_path, prefill_path], folder.name) if beside == "auto" else beside):
            decode = create_session(onnx_path, requested=["CPUExecutionProvider"], threads=half,
                                    spinning=spinning, spin_after_run=False).session
            # On one thread a run computes on its caller's, so the two may share a session of the one graph.
            prompt = decode if prefill_path is None and half == 1 else create_session(
                prefill_path or onnx_path, requested=["CPUExecutionProvider"], threads=half, spinning=spinning,
                spin_after_run=False).session
            self.beside_sessions = (decode, prompt)
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        self.present_names = [o.name for o in self.session.get_outputs() if o.name.startswith("present")]
        if not self.past_names or len(self.past_names) != len(self.present_names):
            raise ModelLoadError(f"{onnx_path} has no KV-cache inputs; export it with `fastllm export`")
        self._output_names = ["logits", *self.present_names]
        self.has_position_ids = "position_ids" in inputs
        first = inputs[self.past_names[0]]
        self.kv_dtype = _ORT_TO_NUMPY.get(first.type, np.float32)
        fp32_cache = first.type == "tensor(float)"
        if manifest.graph == "fused" and self.provider in _DEVICES and fp32_cache:
            # ONNX Runtime places the attention on the CPU then, and copies the cache there and back each step.
            log.warning("%s is a fused fp32 graph: %s has no fp32 GroupQueryAttention kernel, so attention runs on "
                        "the CPU; export with --graph fused --dtype fp16 [--quantize int4] for GPUs",
                        folder.name, self.provider)
        self.num_kv_heads = manifest.num_kv_heads or int(first.shape[1])
        self.head_dim = manifest.head_dim or int(first.shape[3])
        # One token's keys and values in every layer: what a sequence's cache grows by per token.
        itemsize = np.dtype(self.kv_dtype).itemsize
        self.kv_token_bytes = len(self.past_names) * self.num_kv_heads * self.head_dim * itemsize
        logits = next(o for o in self.session.get_outputs() if o.name == "logits")
        self._logits_dtype = _ORT_TO_NUMPY.get(logits.type, np.float32)
        # The graph knows better than a hub repo's config.json; shared decoding binds a logits buffer.
        self.vocab_size = logits.shape[-1] if isinstance(logits.shape[-1], int) else manifest.vocab_size
        # GroupQueryAttention graphs (ours, or a hub repo built by the GenAI builder) take no position_ids
        # and read each row's length from the mask: their batches are right-padded.
        self.right_padded = manifest.graph == "fused" or not self.has_position_ids
        # Prompts of different lengths share one prefill where each row's last logits can be found: graphs
        # that gather them per row (see export.quantize.keep_last_logits) or that return every position.
        self.batched_prefill = self.right_padded and manifest.logits in ("per-row", "all")
        # Whether a step can return logits for several positions per row, as a decode step that verifies k
        # drafted tokens needs (k + 1): ours take how many (num_logits_to_keep); graphs of others give them all.
        self.keeps_logits = LOGITS_TO_KEEP in inputs
        self.multi_position_logits = self.keeps_logits or manifest.logits == "all"
        # "auto" binds on device providers, where it saves two copies of the whole cache per step; "on"
        # also binds on the CPU (same results; used to test this path where no GPU is).
        device = _DEVICES.get(self.provider)
        self.binding_device: tuple[str, int] | None = None
        if io_binding == "on" or (io_binding == "auto" and device):
            options = (provider_options or {}).get(self.provider, {})
            self.binding_device = (device or "cpu", int(options.get("device_id", 0)) if device else 0)
        # GroupQueryAttention writes new keys/values into the past buffer itself when past and present are
        # the same memory (ONNX Runtime compares the pointers): see forward(in_place=True). On the CPU the
        # buffers are numpy arrays; on CUDA (whose kernel is fp16/bf16 only) device OrtValues, which also
        # spares ONNX Runtime allocating a grown present per step: on an H200 that allocation made every
        # step at a sequence length not seen before about 15x slower.
        on_cpu = self.binding_device is None and self.provider == "CPUExecutionProvider"
        on_cuda = self.provider == "CUDAExecutionProvider" and self.binding_device is not None and not fp32_cache
        self.shares_kv = self.right_padded and self.vocab_size > 0 and (on_cpu or on_cuda)
        # by (slot, rows, one logits position per row, session): the running batch's buffers ("batch"), those
        # of a prompt read between its steps ("prefill") and those of one read beside them, in a thread of its own
        # ("beside"), keep a binding each; the lock guards the dict, not the runs
        self._shared: dict[tuple[str, int, bool, int], _SharedBinding] = {}
        self._shared_lock = threading.Lock()

    def release(self, slot: str | None = None) -> None:
        """Let go of the kept bindings (``slot``'s, or all), and so of the cache buffers they hold, once nothing
        decodes into them."""
        with self._shared_lock:
            self._shared = {key: kept for key, kept in self._shared.items() if slot is not None and key[0] != slot}

    def one_row_drift(self, *, prompt: bool = False) -> float:
        """How far apart one decode step's logits come out for a row alone and for the same row in a batch of
        two (the largest difference; 0.0 where they are the same bits), through the main graph or the prompt graph.

        Whether greedy answers can be the same alone and under load depends on the CPU, not only on the graphs:
        ONNX Runtime's MLAS picks MatMulNBits kernels by instruction set and by rows. On AVX-512 CPUs a row's
        products come out alike at one row and at several; on an AVX2-only AMD EPYC (Zen 3) a one-row product
        has a kernel of its own whose sums round in another order (1e-6 apart), and int8 compute
        (``accuracy_level`` 4) quantizes each layer's input again, so a last-bit difference turns into another
        int8 value somewhere and the logits end up far apart: SmolLM2's and Qwen2.5-Coder-0.5B's int4 graphs
        0.21 and 0.14 apart after one step from an empty past (this probe), 0.4-4 with a past. In the int8
        prompt graph every layer's product is integer arithmetic, the same at any row count; only its int4
        vocabulary projection has the one-row kernel, so its drift stays at rounding."""
        logits = [self.forward(np.ones((rows, 1), dtype=np.int64), np.ones((rows, 1), dtype=np.int64),
                               np.zeros((rows, 1), dtype=np.int64), self.empty_past(rows), prompt=prompt).logits
                  for rows in (1, 2)]
        return float(np.abs(logits[1] - logits[0][0]).max())

    def empty_past(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.num_kv_heads, 0, self.head_dim)
        return [np.zeros(shape, dtype=self.kv_dtype) for _ in self.past_names]

    def prefill(self, prompts: list[list[int]], *, beside: bool = False) -> StepOutput:
        """Run several prompts as one padded batch, padded on the side this graph's cache uses.

        Only right-padded (fused) graphs batch prompts of different lengths: their attention reads each
        row's length from the mask, so a row computes exactly what it would alone. Left-padded graphs
        would shift each row's softmax sums by the padding and change greedy answers in the last bits.
        """
        width = max(len(p) for p in prompts)
        ids = np.zeros((len(prompts), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            cut = slice(0, len(prompt)) if self.right_padded else slice(width - len(prompt), width)
            ids[row, cut] = prompt
            mask[row, cut] = 1
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        out = self.forward(ids, mask, positions, self.empty_past(len(prompts)), all_logits=True, prompt=True,
                           beside=beside)
        if self.right_padded and out.logits.shape[1] == width > 1:  # a graph that returns every position
            last = np.asarray([len(p) - 1 for p in prompts])
            return StepOutput(logits=out.logits[np.arange(len(prompts)), last], present=out.present)
        return StepOutput(logits=out.logits[:, -1, :], present=out.present)

    def prefill_after(self, prompt: list[int], start: int, past: list[KV], *, in_place: bool = False,
                      slot: str = "prefill", beside: bool = False) -> StepOutput:
        """One prompt whose first ``start`` tokens' KV is ``past``: only the rest is computed, in one
        multi-token step with a past (the step chunked prefill and speculative verification take too).
        Both graph kinds give exactly the logits of a whole prefill (checked in the tests).

        ``in_place`` (``shares_kv`` graphs): ``past`` are buffers with room for the whole prompt
        (``kv_buffers``), and the graph writes the new keys and values into them: nothing is copied, and the
        present returned is the buffers (on a GPU their device copies, to pass to the next chunk). A prompt read
        in chunks that each copied its whole past into a new present paid for its length at every chunk: the
        32-token chunks of a 2k-token prompt grew from 21 to 42 ms (SmolLM2 int4, 2 cores), 37 ms in place.

        In place on the CPU, a long rest goes in pieces of ``PROMPT_PIECE`` tokens: ONNX Runtime's CPU
        GroupQueryAttention scores each new token against the whole S x T span (the causal half too, then
        zeroed) in a score matrix per head, which pieces on the KV of those before mostly skip; and a piece's
        activations and score matrices stay in the cores' caches. The logits are the same bits (each score is the
        same dot product; tested). Whole, then in pieces of 1,024, 512, 256 and 128 tokens (2-core Xeon, int8
        prompt graphs, one run): 4,096 tokens of SmolLM2 in 5.97, 5.80, 4.55, 4.09 and 4.34 s; of
        Qwen2.5-Coder-0.5B, pieces from 1,024 down, 8.31, 6.76, 6.04 and 6.01 s; 1,024 tokens whole and in pieces of
        256, 0.90 and 0.54 s (SmolLM2), 1.48 and 0.92 s (Qwen). On an AMD EPYC, pieces of 1,024 had read 3.5k tokens
        in 2.58 instead of 2.84 s."""
        if not in_place:
            return self.forward(*self._prompt_feeds(prompt, start, len(prompt)), past, prompt=True, beside=beside)
        piece = PROMPT_PIECE if self.provider == "CPUExecutionProvider" else len(prompt)
        while True:
            end = len(prompt) if len(prompt) - start <= piece + 1 else start + piece  # never a one-token last piece
            out = self.forward(*self._prompt_feeds(prompt, start, end), past, in_place=True, slot=slot, prompt=True,
                               beside=beside)
            past, start = out.present, end
            if end == len(prompt):
                return StepOutput(logits=out.logits.copy(), present=out.present)  # the bound logits buffer is reused

    @staticmethod
    def _prompt_feeds(prompt: list[int], start: int, end: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """input ids, attention mask and positions of ``prompt[start:end]`` read on the KV of the tokens before."""
        return (np.asarray([prompt[start:end]], dtype=np.int64), np.ones((1, end), dtype=np.int64),
                np.arange(start, end, dtype=np.int64)[None])

    def kv_buffers(self, tokens: int) -> list[np.ndarray]:
        """Buffers for one sequence of up to ``tokens`` tokens, to be written in place (``prefill_after``); left
        unwritten, as GroupQueryAttention reads a row only up to its length (see BatchCache._stack)."""
        return [np.empty((1, self.num_kv_heads, tokens, self.head_dim), dtype=self.kv_dtype) for _ in self.past_names]

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                past: list[KV], *, all_logits: bool = False, in_place: bool = False, keep: int = 1,
                slot: str = "batch", prompt: bool = False, beside: bool = False) -> StepOutput:
        """Run one step; ``attention_mask`` covers past and new tokens, 0 marks padding. ``keep``: the last
        positions per row whose logits ``all_logits`` returns, where the graph computes only those. ``prompt``:
        through the prompt graph where the export has one (a prompt's tokens, or a decode step of many rows:
        GenerationEngine._decode_step). ``beside``: a prompt is
        being read beside the decode steps, so both run on the sessions with half the threads, where there are.

        ``in_place`` (with ``shares_kv``): ``past`` are buffers with spare columns, bound as the present
        too, so the graph writes the new keys/values into them instead of copying the whole cache into a
        new present (+15-20% single-stream decode for SmolLM2 int4 on 2 cores). The logits returned are
        then valid until the next step in the same ``slot``.
        """
        feeds: dict[str, np.ndarray] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.has_position_ids:
            feeds["position_ids"] = position_ids
        if self.keeps_logits:
            feeds[LOGITS_TO_KEEP] = np.asarray([keep], dtype=np.int64)
        if beside and self.beside_sessions is not None:
            session = self.beside_sessions[1 if prompt else 0]
        else:
            session = self.prompt_session if prompt else self.session
        if in_place:
            logits, present = self._in_place(feeds, past, slot, session)
        elif self.binding_device is not None:
            logits, present = self._bound(feeds, past, session)
        else:
            feeds.update(zip(self.past_names, past, strict=True))
            outputs = session.run(self._output_names, feeds)
            logits, present = outputs[0], outputs[1:]
        if not all_logits:
            logits = logits[:, -1, :]
        return StepOutput(logits=logits.astype(np.float32, copy=False), present=present)

    def _in_place(self, feeds: dict[str, np.ndarray], past: list[KV], slot: str,
                  session: ort.InferenceSession) -> tuple[np.ndarray, list[KV]]:
        """One decode step on shared buffers; the binding lives as long as the cache keeps its buffers.

        Host buffers from the cache (after rows joined or left, or the buffers grew) go to the device once
        on a GPU; the device buffers are then the cache, handed back as the present.
        """
        rows, new = feeds["input_ids"].shape
        # One binding for plain decode steps, whose logits go into a buffer bound once, and one for steps that
        # verify drafts, whose logits (a shape per draft length) ONNX Runtime allocates: a buffer per length
        # would pile up (33 positions of a 152k vocabulary are 20 MB).
        single = new == 1 or (self.keeps_logits and int(feeds[LOGITS_TO_KEEP][0]) == 1)
        key = (slot, rows, single, id(session))
        with self._shared_lock:
            shared = self._shared.get(key)
        if shared is None or shared.past is not past:
            with self._shared_lock:
                stale = any(kept.past is not past for (owner, *_), kept in self._shared.items() if owner == slot)
            if stale:
                self.release(slot)  # bound to buffers the cache has since replaced
            binding = session.io_binding()
            device, device_id = self.binding_device or ("cpu", 0)
            logits = np.empty((rows, 1, self.vocab_size) if single else (0,), dtype=self._logits_dtype)
            # The logits first, so that get_outputs()[0] is them; an allocating binding is renewed every run below.
            if single:
                binding.bind_output("logits", "cpu", 0, logits.dtype, list(logits.shape), logits.ctypes.data)
            else:
                binding.bind_output("logits", "cpu")
            buffers = [value if isinstance(value, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(
                value, device, device_id) for value in past]  # on the CPU an OrtValue over the array itself
            for past_name, present_name, buffer in zip(self.past_names, self.present_names, buffers, strict=True):
                binding.bind_ortvalue_input(past_name, buffer)
                binding.bind_ortvalue_output(present_name, buffer)
            on_device = self.binding_device is not None and not all(isinstance(v, ort.OrtValue) for v in past)
            kept = buffers if on_device else past
            shared = _SharedBinding(past=kept, binding=binding, logits=logits)
            with self._shared_lock:
                self._shared[key] = shared
        for name, value in feeds.items():
            shared.binding.bind_cpu_input(name, value)
        if not single:  # a binding keeps the last run's output, which would then have to fit this run's shape
            shared.binding.bind_output("logits", "cpu")
        session.run_with_iobinding(shared.binding)
        if single:
            return shared.logits, shared.past
        return shared.binding.get_outputs()[0].numpy(), shared.past

    def _bound(self, feeds: dict[str, np.ndarray], past: list[KV],
               session: ort.InferenceSession) -> tuple[np.ndarray, list[KV]]:
        device, device_id = self.binding_device or ("cpu", 0)
        binding = session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        binding.bind_output("logits", "cpu")  # first, so that get_outputs()[0] is the logits
        for past_name, present_name, value in zip(self.past_names, self.present_names, past, strict=True):
            if isinstance(value, np.ndarray):  # after rows joined or left: one copy up
                binding.bind_cpu_input(past_name, value)
            else:
                binding.bind_ortvalue_input(past_name, value)
            binding.bind_output(present_name, device, device_id)
        session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return outputs[0].numpy(), list(outputs[1:])


def _fits_beside(graphs: list[Path | None], name: str, memory: int | None = None) -> bool:
    """Whether a second pair of sessions for ``graphs`` (about their files' size again) fits ``prefill_beside =
    "auto"``'s share of ``memory`` (this process's, by default)."""
    graph_bytes = sum(f.stat().st_size for g in graphs if g is not None
                      for f in g.parent.glob(g.name + "*") if f.is_file())  # model.onnx, .onnx.data, .onnx_data
    memory = memory_bytes() if memory is None else memory
    fits = graph_bytes <= memory * BESIDE_MEMORY_SHARE
    log.info("prefill_beside auto for %s: %s (graphs %.0f MB, memory %.1f GB)", name, "on" if fits else "off",
             graph_bytes / 1e6, memory / 1e9)
    return fits
