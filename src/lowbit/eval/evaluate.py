"""Perplexity, KL(base ‖ model) and top-1 agreement from one forward pass of the evaluated model.

The base model's side is computed once per (model, windows) and cached on disk (`BaseOutputs`): for
every window its log-softmax in fp16, its argmax and its window NLL. Every later evaluation against the
same base then costs one forward pass instead of two, and the fp row of a table is the base's own NLL.

Formulas (window w, positions t = 0..T−1, vocabulary v):
* perplexity: the GPTQ protocol, exp(mean_w L_w) with L_w the mean NLL of tokens 2..T of window w
  (see `lowbit.eval.perplexity`);
* KL_t = Σ_v p_t(v)·(log p_t(v) − log q_t(v)) over every position t (each is a next-token distribution),
  p the base, q the evaluated model; the mean over all positions of all windows is reported, with the
  median / p95 / max per position;
* top-1 agreement: the share of positions where argmax q_t = argmax p_t (the base argmax is taken in
  float32 before the fp16 rounding, so rounding cannot flip it).

Precision of the cache: fp16 keeps log p to half an ulp, ≈ 2^-11·|log p| (0.002 at log p = −6). Used as
stored, p̃ = exp(l̃) sums to 1 + Σ p·δ, and that first-order error moved a KL of 1.2e-3 by 0.6 % on the
toy model. So the stored log-probs are renormalised (l̂ = l̃ − logsumexp l̃) before use: for a proper
distribution a perturbation δ with Σ p·δ = 0 changes KL(p‖q) only by Σ p·δ·(log p − log q), δ times the
small log-ratio, second order in the rounding: on the toy model the cached KL then agrees with the
two-model fp32 KL within 5e-7 nats (4e-4 relative at KL 1.2e-3; `tests/test_compare.py` holds it to
1e-6 nats), against 6.5e-6 without the renormalisation.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from lowbit.errors import LowbitError
from lowbit.fingerprint import sha
from lowbit.eval.perplexity import check_windows, window_logits
from lowbit.io.atomic import atomic_save_safetensors
from lowbit.progress import progress_iter


@dataclass
class EvalResult:
    ppl: float
    nll_mean: float
    n_windows: int
    seqlen: int
    n_tokens: int  # predicted tokens: n_windows · (seqlen − 1)
    kl: float | None = None  # nats per position, mean over n_windows · seqlen positions
    kl_median: float | None = None
    kl_p95: float | None = None
    kl_max: float | None = None
    top1_agreement: float | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def windows_digest(windows: torch.Tensor) -> str:
    t = windows.detach().cpu().contiguous().to(torch.int64)
    return sha(str(tuple(t.shape)).encode(), t.numpy().tobytes())[:12]


class BaseOutputs:
    """The base model's outputs on evaluation windows, one safetensors file per window under `root`:
    `logprobs` fp16 [T, V], `argmax` int32 [T], `nll` float64 [1]. Files are written atomically, so a
    killed fill leaves only complete windows and the next fill computes the rest."""

    def __init__(self, root: str | Path, windows: torch.Tensor):
        check_windows(windows)
        self.root, self.windows = Path(root), windows

    @classmethod
    def for_model(cls, cache: str | Path, model_key: str, windows: torch.Tensor, dataset: str) -> "BaseOutputs":
        """The cache entry of `model_key` on these windows: keyed by the windows' digest too, so another
        tokenizer or seqlen never reuses it. Windows that are a prefix of a longer set share its files
        only when their digests agree, which keeps the rule simple: one entry per exact window set."""
        n, t = windows.shape
        return cls(Path(cache) / f"{model_key}-{dataset}-s{t}-n{n}-{windows_digest(windows)}", windows)

    def path(self, i: int) -> Path:
        return self.root / f"window-{i:05d}.safetensors"

    def missing(self) -> list[int]:
        return [i for i in range(self.windows.shape[0]) if not self.path(i).is_file()]

    def fill(self, base_model: nn.Module, batch_size: int = 8, progress: bool = False) -> None:
        """Compute and store every missing window with `base_model`."""
        todo = self.missing()
        if not todo:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        was = base_model.training
        base_model.eval()
        starts = range(0, len(todo), batch_size)
        with torch.inference_mode():
            for s in progress_iter(starts, "base model outputs (cached)", progress):
                idx = todo[s:s + batch_size]
                batch = self.windows[idx]
                logits = window_logits(base_model, batch)
                for j, i in enumerate(idx):
                    lp = F.log_softmax(logits[j].float(), dim=-1)
                    nll = F.nll_loss(lp[:-1], batch[j, 1:].to(lp.device), reduction="mean").double().cpu()
                    tensors = {"logprobs": lp.to(torch.float16).cpu(), "argmax": lp.argmax(-1).to(torch.int32).cpu(),
                               "nll": nll.reshape(1)}
                    atomic_save_safetensors(tensors, self.path(i))
        base_model.train(was)

    def load(self, i: int) -> dict[str, torch.Tensor]:
        p = self.path(i)
        try:
            t = load_file(p)
        except (OSError, SafetensorError) as e:
            raise LowbitError(f"cached base outputs {p} are unreadable ({e}); delete {self.root} to recompute") from None
        T = self.windows.shape[1]
        if t.get("logprobs") is None or t["logprobs"].shape[0] != T or t.get("argmax") is None:
            raise LowbitError(f"cached base outputs {p} do not match the windows; delete {self.root} to recompute")
        return t

    def window_nll(self) -> torch.Tensor:
        return torch.cat([self.load(i)["nll"] for i in range(self.windows.shape[0])])


def protocol_windows(tokenizer, protocol, data=None) -> torch.Tensor:
    """The WikiText-2 test windows of `protocol` (`lowbit.eval.protocol.Protocol`): [n, seqlen] tokens."""
    from lowbit import data as datasets

    return datasets.eval_windows(tokenizer, datasets.wikitext2_test_text(data), protocol.seqlen, protocol.windows)


def base_outputs(base_model: nn.Module, key: str, windows: torch.Tensor, protocol, progress: bool = True) -> BaseOutputs:
    """The base model's cached outputs on `windows` under lowbit's cache, computed for the windows not
    cached yet. `key` names the base weights (`lowbit.eval.protocol.model_key`)."""
    from lowbit.cache import cache_root

    base = BaseOutputs.for_model(cache_root() / "base-outputs", key, windows, protocol.dataset)
    base.fill(base_model, protocol.batch_size, progress)
    return base


def _summary(window_nll: torch.Tensor, seqlen: int) -> tuple[float, float]:
    n = window_nll.numel()
    nll_mean = float((window_nll * seqlen).sum() / (n * seqlen))  # GPTQ's formula (see perplexity.py)
    return math.exp(nll_mean), nll_mean


def base_result(base: BaseOutputs) -> EvalResult:
    """The base model's own row: its perplexity, KL 0, agreement 1 (from the cache, no forward pass)."""
    n, seqlen = base.windows.shape
    ppl, nll = _summary(base.window_nll(), seqlen)
    return EvalResult(ppl, nll, n, seqlen, n * (seqlen - 1), 0.0, 0.0, 0.0, 0.0, 1.0)


def evaluate(model: nn.Module, windows: torch.Tensor, base: BaseOutputs | None = None, batch_size: int = 8,
             progress: bool = False) -> EvalResult:
    """Perplexity of `model` on `windows`, and with `base` (filled) the KL and top-1 agreement too."""
    check_windows(windows)
    if base is not None:
        if not torch.equal(base.windows, windows):
            raise LowbitError("the cached base outputs belong to other windows")
        if base.missing():
            raise LowbitError(f"{len(base.missing())} windows of the base outputs are not computed; call fill()")
    t0 = time.perf_counter()
    n, seqlen = windows.shape
    was = model.training
    model.eval()
    window_nll = torch.empty(n, dtype=torch.float64)
    kls, agree = [], []
    with torch.inference_mode():
        for s in progress_iter(range(0, n, batch_size), "evaluation", progress):
            batch = windows[s:s + batch_size]
            logits = window_logits(model, batch)
            for j in range(logits.shape[0]):  # one window at a time bounds the float32 copies
                lq = F.log_softmax(logits[j].float(), dim=-1)
                window_nll[s + j] = F.nll_loss(lq[:-1], batch[j, 1:].to(lq.device), reduction="mean").double().cpu()
                if base is None:
                    continue
                ref = base.load(s + j)
                lp = ref["logprobs"].to(lq.device).float()
                lp = lp - lp.logsumexp(-1, keepdim=True)  # renormalised: see the module docstring
                if lp.shape != lq.shape:
                    raise LowbitError(f"model and base disagree on the output shape: {tuple(lq.shape)} vs "
                                      f"{tuple(lp.shape)} (different vocabularies?)")
                kls.append(F.kl_div(lq, lp, reduction="none", log_target=True).sum(-1).double().cpu())
                agree.append((lq.argmax(-1).cpu() == ref["argmax"].long()))
    model.train(was)
    ppl, nll_mean = _summary(window_nll, seqlen)
    res = EvalResult(ppl, nll_mean, n, seqlen, n * (seqlen - 1))
    if base is not None:
        kl = torch.cat(kls).clamp_min(0)  # rounding gives −1e−9 where the distributions coincide
        ranks = [int(0.5 * (kl.numel() - 1)), int(0.95 * (kl.numel() - 1))]
        q = torch.sort(kl).values[ranks]
        res.kl, res.kl_median, res.kl_p95, res.kl_max = float(kl.mean()), float(q[0]), float(q[1]), float(kl.max())
        res.top1_agreement = float(torch.cat(agree).double().mean())
    res.seconds = time.perf_counter() - t0
    return res
