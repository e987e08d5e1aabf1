"""A GGUF file run by llama.cpp itself (the `llama-cpp-python` package), wrapped as a model that lowbit's
evaluation scores like any other: `perplexity`, KL against the base and the shared protocol apply unchanged,
so a GGUF export is judged by the runtime its users run, on the same windows as lowbit's own reading.

Each window is evaluated from an empty KV cache, all positions' logits kept (llama.cpp's `logits_all`),
exactly the protocol's independent windows. llama.cpp computes with its own kernels (K-quant dot products
against activations quantized to 8 bits, fp16 intermediate tensors), so its figures differ slightly from
those of a float dequantization of the same blocks; that difference is what a comparison measures.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from lowbit.errors import LowbitError


class LlamaCppLM(nn.Module):
    def __init__(self, gguf_file: str | Path, n_ctx: int = 2048, n_threads: int | None = None):
        super().__init__()
        try:
            from llama_cpp import Llama
        except ImportError as e:
            raise LowbitError("running a GGUF file with llama.cpp needs the llama-cpp-python package "
                              "(pip install 'lowbit[llamacpp]')") from e
        path = Path(gguf_file)
        if not path.is_file():
            raise LowbitError(f"no GGUF file at {path}")
        self.n_ctx = n_ctx
        self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True,
                         n_threads=n_threads or torch.get_num_threads(), verbose=False)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, **_) -> SimpleNamespace:
        if input_ids.shape[-1] > self.n_ctx:
            raise LowbitError(f"windows of {input_ids.shape[-1]} tokens exceed the context of {self.n_ctx}")
        out = []
        for row in input_ids.reshape(-1, input_ids.shape[-1]):
            self.llm.reset()
            self.llm.eval(row.tolist())
            out.append(torch.from_numpy(np.array(self.llm.scores[: row.shape[0]], dtype=np.float32)))
        return SimpleNamespace(logits=torch.stack(out).reshape(*input_ids.shape, -1))

    def close(self) -> None:
        """Free llama.cpp's model and context now (not at interpreter exit, where its finalizer fails)."""
        if getattr(self, "llm", None) is not None:
            self.llm.close()
            self.llm = None
