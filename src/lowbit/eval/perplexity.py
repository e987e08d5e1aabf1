"""Perplexity with the GPTQ protocol (IST-DASLab/gptq, `llama_eval`), so numbers compare with the papers.

The test text is cut into non-overlapping windows of `seqlen` tokens; each window is evaluated on its own
(no context carried over). Within window w the model predicts tokens 2..seqlen, giving seqlen−1 NLLs
whose mean is L_w. The reference then computes

    ppl = exp( Σ_w L_w · seqlen / (n_windows · seqlen) ) = exp(mean_w L_w),

i.e. the mean of per-window mean NLLs (all windows have seqlen−1 predictions, so this is also the mean
over all predicted tokens). We reproduce that formula exactly, accumulating in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError


@dataclass
class PerplexityResult:
    ppl: float
    nll_mean: float  # mean NLL per predicted token, nats
    n_windows: int
    seqlen: int
    n_tokens: int  # predicted tokens: n_windows · (seqlen − 1)


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def check_windows(windows: torch.Tensor) -> None:
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise LowbitError(f"evaluation windows must be a [n ≥ 1, seqlen ≥ 2] token tensor, got {tuple(windows.shape)}")


def window_logits(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Logits [b, seqlen, vocab] of full windows (no padding, no KV cache kept)."""
    out = model(input_ids=batch.to(model_device(model)), use_cache=False)
    return out.logits if hasattr(out, "logits") else out[0]


def batches(n: int, batch_size: int, progress: bool, label: str):
    starts = range(0, n, max(1, batch_size))
    if progress:  # on stderr: stdout may carry the results (--json)
        from rich.console import Console
        from rich.progress import track

        return track(starts, description=label, total=len(starts), console=Console(stderr=True))
    return starts


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4,
               progress: bool = False) -> PerplexityResult:
    check_windows(windows)
    n, seqlen = windows.shape
    was_training = model.training
    model.eval()
    window_nll = torch.empty(n, dtype=torch.float64)
    with torch.inference_mode():
        for s in batches(n, batch_size, progress, "perplexity"):
            batch = windows[s:s + batch_size]
            logits = window_logits(model, batch)
            labels = batch[:, 1:].to(logits.device)
            for i in range(logits.shape[0]):  # one window at a time: bounds the float32 copy of the logits
                nll = F.cross_entropy(logits[i, :-1].float(), labels[i], reduction="mean")
                window_nll[s + i] = nll.double().cpu()
    model.train(was_training)
    # GPTQ: nlls.append(loss · seqlen); ppl = exp(sum(nlls) / (n · seqlen)).
    nll_mean = float((window_nll * seqlen).sum() / (n * seqlen))
    return PerplexityResult(math.exp(nll_mean), nll_mean, n, seqlen, n * (seqlen - 1))
