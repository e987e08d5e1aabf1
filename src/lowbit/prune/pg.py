"""Policy-gradient pruning of a decoder's KV groups and MLP channels (`policy.optimise` on the model).

The loss of a sampled mask is the next-token cross-entropy of the masked model on one calibration batch
(batch t of the run's windows at step t, cycling), forward passes only, no gradients. The keep
probabilities start from the `activation` scores (`policy.init_from_scores`), one budget for the groups
and one for the channels, both global over layers (so layers end with different widths). The final masks
keep the largest s, then `structured.compensate` may refit o_proj / down_proj by least squares.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from lowbit.prune import policy
from lowbit.prune.structured import Structures, masked, scores


@torch.no_grad()
def batch_loss(model, ids: torch.Tensor) -> float:
    dev = next(model.parameters()).device
    ids = ids.to(dev)
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))


def pg_masks(model, S: Structures, windows: torch.Tensor, keep: float, moments, *, steps: int,
             batch_size: int = 8, samples: int = 2, lr: float = 2e-3, window: int = 5, spread: float = 1.0,
             seed: int = 0, progress=None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(group mask, channel mask, record): learned Bernoulli policy, hard masks by the largest s."""
    gs, cs = scores(S, "activation", moments)
    s0 = torch.cat([policy.init_from_scores(gs, keep, S.n_kv, spread),
                    policy.init_from_scores(cs, keep, S.n_channels, spread)])
    ng = S.n_groups
    batches = [windows[i:i + batch_size] for i in range(0, windows.shape[0] - batch_size + 1, batch_size)]
    history: list[dict] = []

    def loss_fn(m: torch.Tensor, t: int) -> float:
        with masked(model, S, m[:ng].float(), m[ng:].float()):
            return batch_loss(model, batches[t % len(batches)])

    def on_step(t, rec):
        history.append(rec)
        if progress is not None:
            progress(t, rec)

    model.eval()
    t0 = time.perf_counter()
    s = policy.optimise(loss_fn, s0, keep, steps=steps, samples=samples, lr=lr, window=window,
                        segments=[(0, ng), (ng, s0.numel())], seed=seed, on_step=on_step)
    from lowbit.prune.slicing import at_least_one

    g = at_least_one(policy.hard_mask(s[:ng], keep), s[:ng], S.n_kv)
    c = at_least_one(policy.hard_mask(s[ng:], keep), s[ng:], S.n_channels)
    init_g, init_c = policy.hard_mask(s0[:ng], keep), policy.hard_mask(s0[ng:], keep)
    rec = {"steps": steps, "samples": samples, "batch_size": batch_size, "seconds": time.perf_counter() - t0,
           "forward_passes": steps * samples, "history": history,
           "changed_vs_start": {"groups": int((g != init_g).sum()) // 2, "channels": int((c != init_c).sum()) // 2}}
    return g, c, rec
