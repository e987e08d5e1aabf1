"""KL(P_base ‖ P_model) of next-token distributions: how far quantization moved the model's predictions.

For every position t of every window, KL_t = Σ_v p_base(v) · (log p_base(v) − log p_model(v)), with both
log-softmaxes in float32. Reported: the mean over all positions, per-token median / p95 / max, and how
often the two models' most likely next token agree. Both models run on the same batch and only that
batch's logits are alive at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError
from lowbit.eval.perplexity import batches, check_windows, window_logits


@dataclass
class KLResult:
    kl_mean: float  # nats per token
    kl_median: float
    kl_p95: float
    kl_max: float
    top1_agreement: float  # fraction of positions where both argmaxes agree
    n_tokens: int


def _token_kl(logits: torch.Tensor, base_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position KL and argmax agreement of one window ([seqlen, vocab] each)."""
    lq = F.log_softmax(logits.float(), dim=-1)
    lp = F.log_softmax(base_logits.float().to(lq.device), dim=-1)
    kl = F.kl_div(lq, lp, reduction="none", log_target=True).sum(-1)
    return kl.double().cpu(), (lq.argmax(-1) == lp.argmax(-1)).cpu()


def kl_divergence(model: nn.Module, base_model: nn.Module, windows: torch.Tensor, batch_size: int = 4,
                  progress: bool = False) -> KLResult:
    """KL(base ‖ model) averaged over every position of every window (`windows`: [n, seqlen] tokens)."""
    check_windows(windows)
    states = (model.training, base_model.training)
    model.eval()
    base_model.eval()
    kls, agree = [], []
    with torch.inference_mode():
        for s in batches(windows.shape[0], batch_size, progress, "KL divergence"):
            batch = windows[s:s + batch_size]
            logits, base_logits = window_logits(model, batch), window_logits(base_model, batch)
            if logits.shape != base_logits.shape:
                raise LowbitError(f"model and base model disagree on the output shape: "
                                  f"{tuple(logits.shape)} vs {tuple(base_logits.shape)} (different vocabularies?)")
            for i in range(logits.shape[0]):  # one window at a time: bounds the float32 log-prob copies
                k, a = _token_kl(logits[i], base_logits[i])
                kls.append(k)
                agree.append(a)
    model.train(states[0])
    base_model.train(states[1])
    kl = torch.cat(kls).clamp_min(0)  # float32 rounding can give −1e−9 where the distributions coincide
    ranks = [int(0.5 * (kl.numel() - 1)), int(0.95 * (kl.numel() - 1))]  # nearest-rank quantiles, any size
    q = torch.sort(kl).values[ranks]
    return KLResult(float(kl.mean()), float(q[0]), float(q[1]), float(kl.max()),
                    float(torch.cat(agree).double().mean()), kl.numel())
