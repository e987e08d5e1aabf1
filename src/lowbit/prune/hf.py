"""UDFC on the MLPs of Hugging Face decoders (LLaMA family: llama, mistral, qwen2), docs/udfc.md §4.

Channel i of layer l is h_i = act(g_i)·u_i with g = W_gate·x̂, u = W_up·x̂ (x̂ the normalised MLP input);
layer l+1 is down_proj. Pruning i deletes row i of gate_proj and up_proj and column i of down_proj; the
compensation folds into down_proj's columns (W' = W_down·T), quantization of the kept gate/up rows is
compensated in the same objective. down_proj has no bias here, so raw (uncentred) moments are used and
no bias is re-fitted (a bias would need `mlp_bias`, which adds biases to gate and up too).

Moments of [h; h̃] per layer:
* data-free: x̂ = norm(ξ), ξ ~ N(0, I_d) (the block's own post-attention RMSNorm/LayerNorm applied to
  Gaussian noise), `mc_samples` samples from a seeded generator, pushed through gate/up (and their
  quantized copies). No text, no tokens.
* data-light: x̂ from the unpruned model on calibration windows (lowbit.data, C4 calib split), one pass.

The HF config has one `intermediate_size`, so every layer keeps the same number of channels (the
ratio is per layer; a global ranking would give different counts and is refused).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.formats.quant_primitives import fake_quantize_affine
from lowbit.prune import compensation as comp
from lowbit.prune import criteria
from lowbit.prune.config import PruneConfig
from lowbit.prune.moments import MomentAccumulator, Moments

SUPPORTED = ("llama", "mistral", "qwen2")


def mlp_blocks(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """[(block name, mlp, the norm before the mlp)] of a supported decoder; LowbitError otherwise."""
    from lowbit.models.adapters import get_adapter

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED:
        raise LowbitError(f"unsupported architecture for MLP pruning: model_type={model_type!r} "
                          f"({type(model).__name__}); supported: {', '.join(SUPPORTED)}")
    adapter = get_adapter(model)
    out = []
    for name, block in adapter.blocks(model):
        mlp, norm = getattr(block, "mlp", None), getattr(block, "post_attention_layernorm", None)
        if mlp is None or norm is None or not all(isinstance(getattr(mlp, p, None), nn.Linear)
                                                  for p in ("gate_proj", "up_proj", "down_proj")):
            raise LowbitError(f"{name}: expected mlp.gate_proj/up_proj/down_proj (nn.Linear) and "
                              "post_attention_layernorm; is the model already pruned or quantized?")
        out.append((name, mlp, norm))
    return out


def _quant(W: torch.Tensor, bits: int | None) -> torch.Tensor:
    return W if bits is None else fake_quantize_affine(W, bits, True, -1).to(W.dtype)


def _hidden(mlp: nn.Module, x: torch.Tensor, Wg: torch.Tensor, Wu: torch.Tensor) -> torch.Tensor:
    g = nn.functional.linear(x, Wg, mlp.gate_proj.bias)
    return mlp.act_fn(g) * nn.functional.linear(x, Wu, mlp.up_proj.bias)


def _weights(mlp, bits):
    Wg, Wu = mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach()
    return Wg, Wu, _quant(Wg, bits), _quant(Wu, bits)


def _accumulate(acc: MomentAccumulator, mlp, x: torch.Tensor, bits) -> None:
    Wg, Wu, Wgq, Wuq = _weights(mlp, bits)
    x = x.reshape(-1, x.shape[-1]).float()
    h = _hidden(mlp, x, Wg, Wu)
    acc.add(h if bits is None else torch.cat([h, _hidden(mlp, x, Wgq, Wuq)], -1))


def data_free_moments(mlp, norm, bits, samples: int, seed: int, chunk: int = 2048) -> Moments:
    """Moments of [h; h̃] with x̂ = norm(ξ), ξ ~ N(0, I): a seeded generator, nothing else."""
    d = mlp.gate_proj.in_features
    n = mlp.gate_proj.out_features
    acc = MomentAccumulator(n if bits is None else 2 * n)
    gen = torch.Generator().manual_seed(seed)
    dtype = mlp.gate_proj.weight.dtype
    for i in range(0, samples, chunk):
        xi = torch.randn(min(chunk, samples - i), d, generator=gen).to(dtype)
        _accumulate(acc, mlp, norm(xi), bits)
    return acc.moments()


def calibration_moments(model, blocks, windows: torch.Tensor, bits, batch_size: int = 4) -> list[Moments]:
    """Moments of [h; h̃] per MLP from the unpruned model's MLP inputs on calibration `windows`."""
    accs = [MomentAccumulator(m.gate_proj.out_features * (1 if bits is None else 2)) for _, m, _ in blocks]
    hooks = [mlp.register_forward_pre_hook(lambda mod, args, acc=acc: _accumulate(acc, mod, args[0], bits))
             for acc, (_, mlp, _) in zip(accs, blocks)]
    dev = next(model.parameters()).device
    try:
        with torch.no_grad():
            for s in range(0, windows.shape[0], batch_size):
                model(input_ids=windows[s:s + batch_size].to(dev), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [a.moments() for a in accs]


def _check_finite(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise LowbitError(f"{name}: NaN/inf values in the weight; refusing to prune")


def _merge_T(jm: comp.JointMoments, keep: torch.Tensor, prune: torch.Tensor, threshold: float) -> torch.Tensor:
    """Single partner per pruned channel (Neuron-Merging style). NM's rule (cosine of filters, norm ratio)
    is exact only for positively homogeneous activations, which SwiGLU is not, so here the partner is
    the kept channel most correlated with h_p and the scale the single-partner optimum E[h_p h̃_k]/E[h̃_k²]."""
    n = jm.aa.shape[0]
    d = torch.sqrt(torch.diagonal(jm.aa).clamp_min(1e-300))
    corr = jm.aa[prune][:, keep] / torch.outer(d[prune], d[keep])
    best, partner = corr.abs().max(dim=1)
    kk = keep[partner]
    scale = jm.aq[prune, kk] / torch.diagonal(jm.qq)[kk].clamp_min(1e-300)
    scale = torch.where(best >= threshold, scale, torch.zeros_like(scale))
    return comp.merge_T(n, keep, prune, partner, scale)


def prune_hf(model: nn.Module, config: PruneConfig, calib_windows: torch.Tensor | None = None,
             inplace: bool = False) -> tuple[nn.Module, dict, dict]:
    """Prune (and with `config.bits` quantize) every MLP of `model`. Returns (model with smaller MLPs and
    updated config, report, {linear name: QuantizedWeight} (empty without bits))."""
    from lowbit.methods.config import RTNConfig
    from lowbit.methods.rtn import rtn_quantize

    criteria.check_ratio(config.ratio)
    if config.scope == "global":
        raise LowbitError("a global ratio would give each layer its own intermediate size, which a LLaMA-style "
                          "config cannot express; use the per-layer ratio")
    if config.data_light and calib_windows is None:
        raise LowbitError("data-light mode needs calibration windows")
    _check_finite(model)
    blocks = mlp_blocks(model)
    if not inplace:
        model = copy.deepcopy(model)
        blocks = mlp_blocks(model)
    model.eval()
    n = blocks[0][1].gate_proj.out_features
    if any(m.gate_proj.out_features != n for _, m, _ in blocks):
        raise LowbitError("MLPs of different widths: expected one intermediate_size")
    k = criteria.n_pruned(n, config.ratio)
    with torch.no_grad():
        moments = (calibration_moments(model, blocks, calib_windows, config.bits) if config.data_light
                   else [None] * len(blocks))
        report = {"config": config.model_dump(), "intermediate_size": [n, n - k], "layers": [],
                  "statistics": "calibration activations" if config.data_light else
                  f"data-free Gaussian proxy ({config.mc_samples} samples, seed {config.seed})"}
        qweights, rtn = {}, RTNConfig(bits=config.bits or 8, group_size=-1, symmetric=True)
        for li, (name, mlp, norm) in enumerate(blocks):
            m = moments[li] if config.data_light else data_free_moments(mlp, norm, config.bits, config.mc_samples,
                                                                        config.seed + li)
            jm = comp.JointMoments.from_joint(m, n)
            Wd = mlp.down_proj.weight.detach()
            centre = mlp.down_proj.bias is not None
            if centre:
                jm = jm.centred()
            G = comp.gram(Wd)
            if k == 0:
                pruned = torch.zeros(0, dtype=torch.long)
            elif config.criterion == "recon":
                pruned = torch.sort(criteria.recon_order(torch.diagonal(G), jm.aa, k, config.damp)).values
            else:
                rows = torch.cat([mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach()], 1)
                pruned = criteria.lowest(criteria.norm_scores(rows, 1 if config.criterion == "l1" else 2), k)
            keep = criteria.keep_from_pruned(n, pruned)
            if config.compensation == "none":
                T = comp.identity_T(n, keep)
            elif config.compensation == "merge":
                T = _merge_T(jm, keep, pruned, config.merge_threshold)
            else:
                T = comp.solve_T(G, jm, keep, config.family, config.damp)
            energy = comp.output_energy(G, jm)
            report["layers"].append({
                "layer": f"{name}.mlp", "pruned": pruned.tolist(),
                "proxy_rel_error_none": comp.expected_error(G, jm, keep, comp.identity_T(n, keep)) / energy,
                "proxy_rel_error": comp.expected_error(G, jm, keep, T) / energy})
            bias = None
            if centre and config.compensation == "udfc":
                bias = (mlp.down_proj.bias.double() + Wd.double() @ comp.bias_shift(jm, keep, T)).to(Wd.dtype)
            _rebuild(mlp, keep, comp.fold(Wd, T), bias)
            if config.bits:
                for p in ("gate_proj", "up_proj", "down_proj"):
                    lin = getattr(mlp, p)
                    q = rtn_quantize(lin.weight.detach(), rtn)
                    qweights[f"{name}.mlp.{p}"] = q
                    lin.weight.data = q.dequantize().to(lin.weight.dtype)
    model.config.intermediate_size = n - k
    report["parameters"] = sum(p.numel() for p in model.parameters())
    if config.bits:
        report["bits_per_weight_mlp"] = (sum(sum(q.storage().values()) for q in qweights.values())
                                         / sum(q.shape[0] * q.shape[1] for q in qweights.values()))
    return model, report, qweights


def _rebuild(mlp: nn.Module, keep: torch.Tensor, W_down: torch.Tensor, down_bias: torch.Tensor | None) -> None:
    k = keep.numel()
    for p in ("gate_proj", "up_proj"):
        old = getattr(mlp, p)
        new = nn.Linear(old.in_features, k, bias=old.bias is not None, dtype=old.weight.dtype)
        new.weight.data = old.weight.detach()[keep].clone()
        if old.bias is not None:
            new.bias.data = old.bias.detach()[keep].clone()
        setattr(mlp, p, new.to(old.weight.device))
    old = mlp.down_proj
    new = nn.Linear(k, old.out_features, bias=old.bias is not None, dtype=old.weight.dtype)
    new.weight.data = W_down
    if old.bias is not None:
        new.bias.data = down_bias if down_bias is not None else old.bias.detach().clone()
    mlp.down_proj = new.to(old.weight.device)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = k
