"""Block-wise reconstruction (LRQ, as in the authors' `quant/REM_fast.py`): quantizer parameters of a
whole decoder block learned against the float block's outputs.

For block ℓ, with X_ℓ the float model's input to it and X̃_ℓ the input produced by the already quantized
blocks 1..ℓ−1, Adam minimises over the block's quantizer parameters (everything else frozen)

    L = mean over tokens of ‖block_ℓ^Q(X̃_ℓ) − block_ℓ^FP(X_ℓ)‖²   (squared error summed over features),

one random batch of `batch_size` calibration windows per step, learning rate cosine-annealed to 0 over
`iters` steps. Then the block's weights are materialised (each LRQLinear becomes a QuantLinear holding a
plain uniform grid) and both streams advance: X_{ℓ+1} = block^FP(X_ℓ), X̃_{ℓ+1} = block^Q(X̃_ℓ).

The calibration driver (`pipeline.calibrate.quantize_model`) owns capture, checkpoints and resume; it
keeps the two streams in one list, `hidden` = X̃ batches then X batches, so a block checkpoint saves both.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from lowbit.formats.quantized_weight import QuantizedWeight
from lowbit.methods.lrq import LRQLinear, LRQWeight
from lowbit.models.adapters import layer_weight
from lowbit.models.swap import make_quant_linear
from lowbit.nn.quant_linear import replace_module
from lowbit.pipeline.block_runner import run_block
from lowbit.qat.loop import run_steps


def block_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the squared error summed over features (the authors' reconstruction loss)."""
    return (out - target).pow(2).sum(-1).mean()


def mean_block_loss(block: nn.Module, inputs: list, ctxs: list, targets: list) -> float:
    with torch.no_grad():
        return sum(float(block_loss(run_block(block, x, c), t)) for x, c, t in zip(inputs, ctxs, targets)) / len(inputs)


def fit_block(block: nn.Module, params: list, inputs: list, ctxs: list, targets: list, *, steps: int, lr: float,
              betas: tuple[float, float], generator: torch.Generator, bars=None) -> float:
    """Adam on `params` for `steps` steps, one random batch each, lr cosine-annealed to 0 (torch's
    CosineAnnealingLR, eta_min 0), minimising `block_loss`. Returns the mean loss over every batch before."""
    loss_start = mean_block_loss(block, inputs, ctxs, targets)
    opt = torch.optim.Adam(params, lr=lr, betas=betas)
    opt.zero_grad(set_to_none=True)
    n = len(inputs)

    def backward(step: int) -> float:
        b = int(torch.randint(n, (1,), generator=generator))
        loss = block_loss(run_block(block, inputs[b], ctxs[b]), targets[b])
        loss.backward()
        return float(loss.detach())

    with torch.enable_grad():
        run_steps(opt, steps, backward=backward, lr_factor=lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)),
                  after=None if bars is None else lambda step, loss, f: bars.step(loss))
    return loss_start


def reconstruct_block(model: nn.Module, block: nn.Module, names: list[str], configs: dict, hidden: list,
                      ctxs: list, *, block_idx: int, advance: bool, bars=None) -> tuple[dict[str, QuantizedWeight], dict]:
    """Learn, materialise and swap in the LRQ weights of `names` (the block's layers, full names); with
    `advance`, replace both streams in `hidden` by this block's outputs. Returns (QuantizedWeights,
    {"loss_start", "loss_end", "seconds", "trainable", "steps"}), the losses averaged over every batch."""
    n = len(hidden) // 2
    xq, ctx_q = hidden[:n], ctxs[:n]
    if not names:  # nothing selected in this block: both streams pass through the float block
        if advance:
            with torch.no_grad():
                for b in range(len(hidden)):
                    hidden[b] = run_block(block, hidden[b], ctxs[b]).float()
        return {}, {"loss_start": 0.0, "loss_end": 0.0, "seconds": 0.0, "trainable": 0, "steps": 0}
    cfg = configs[names[0]]  # block-level settings (steps, rate, batch, seed) from the block's first layer
    with torch.no_grad():
        targets = [run_block(block, hidden[n + b], ctxs[n + b]).float() for b in range(n)]

    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(cfg.seed * 100003 + block_idx)
    originals, quantizers = {}, {}
    for name in names:
        module = model.get_submodule(name)
        originals[name] = module
        quantizers[name] = LRQWeight(layer_weight(module).float(), configs[name], generator=gen)
        replace_module(model, name, LRQLinear(quantizers[name], getattr(module, "bias", None), configs[name].act))
    params = [p for q in quantizers.values() for p in q.parameters()]
    t0 = time.perf_counter()
    try:
        loss_start = fit_block(block, params, xq, ctx_q, targets, steps=cfg.iters, lr=cfg.learning_rate(),
                               betas=(0.9, 0.999), generator=gen, bars=bars)
    finally:
        for p in frozen:
            p.requires_grad_(True)

    done = {}
    for name in names:
        qw = quantizers[name].materialize()
        qw.dtype = layer_weight(originals[name]).dtype
        ql = make_quant_linear(originals[name], qw, name)
        ql.act = configs[name].act  # W4A8: the quantized stream runs as deployed, activations quantized
        replace_module(model, name, ql)
        done[name] = qw
    with torch.no_grad():
        outs = [run_block(block, xq[b], ctx_q[b]).float() for b in range(n)]
    loss_end = sum(float(block_loss(o, t)) for o, t in zip(outs, targets)) / n
    if advance:
        for b in range(n):
            hidden[b], hidden[n + b] = outs[b], targets[b]
    info = {"loss_start": loss_start, "loss_end": loss_end, "seconds": time.perf_counter() - t0,
            "trainable": sum(q.trainable() for q in quantizers.values()), "steps": cfg.iters}
    return done, info


# ---- AQLM's block fine-tuning: codebooks and row scales of a quantized block, codes fixed


class AdditiveLinear(nn.Module):
    """A trainable view of an AQLM layer: Ŵ = s ⊙ Σ_m C_m[b] with the codes b fixed and C, s learned. The
    forward uses C and s rounded to fp16 (straight-through), so the stored layer is the trained one."""

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None):
        super().__init__()
        g = qw.grid
        self.qw = qw
        self.codebooks = nn.Parameter(g.codebooks.float().clone())
        self.scale = nn.Parameter(g.scale.float().clone())
        self.register_buffer("codes", qw.codes)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @staticmethod
    def _fp16(t: torch.Tensor) -> torch.Tensor:
        return t + (t.to(torch.float16).float() - t).detach()

    def weight(self) -> torch.Tensor:
        from lowbit.formats.additive import additive_vectors

        rows = self.codes.shape[0]
        v = additive_vectors(self._fp16(self.codebooks), self.codes)  # [rows, J, g]
        return (v * self._fp16(self.scale)[:, None, None]).reshape(rows, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight(), self.bias)

    @torch.no_grad()
    def materialize(self) -> QuantizedWeight:
        import dataclasses

        grid = dataclasses.replace(self.qw.grid, codebooks=self.codebooks.to(torch.float16),
                                   scale=self.scale.to(torch.float16))
        return dataclasses.replace(self.qw, grid=grid)


def tune_additive_block(model: nn.Module, block: nn.Module, names: list[str], configs: dict, inputs: list,
                        ctxs: list, targets: list, *, block_idx: int, bars=None) -> tuple[dict, dict]:
    """AQLM's block fine-tuning (the authors' `finetune_groupwise`): after the block's layers are quantized,
    Adam (the authors' README example: lr 1e-4, β = (0.9, 0.999)) on their codebooks and row scales, codes fixed, against the float block's outputs
    on the same (quantized-prefix) inputs, the mean squared error per token. Returns the new
    QuantizedWeights and {"loss_start", "loss_end", "steps"}."""
    cfg = configs[names[0]]
    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    layers = {}
    for name in names:
        ql = model.get_submodule(name)
        layers[name] = (ql, AdditiveLinear(ql.qweight, ql.bias))
        replace_module(model, name, layers[name][1])
    gen = torch.Generator().manual_seed(cfg.seed * 100003 + block_idx)
    params = [p for _, a in layers.values() for p in a.parameters()]
    try:
        loss_start = fit_block(block, params, inputs, ctxs, targets, steps=cfg.finetune_steps, lr=cfg.finetune_lr,
                               betas=(0.9, 0.999), generator=gen, bars=bars)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    done = {}
    for name, (ql, a) in layers.items():
        qw = a.materialize()
        replace_module(model, name, make_quant_linear(ql, qw, name))
        done[name] = qw
    return done, {"loss_start": loss_start, "loss_end": mean_block_loss(block, inputs, ctxs, targets),
                  "steps": cfg.finetune_steps}
