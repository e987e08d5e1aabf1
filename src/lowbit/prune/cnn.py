"""UDFC on any torch.nn CNN: find Conv/Linear → BatchNorm → ReLU → Conv/Linear chains, prune and quantize
layer l's channels, fold the compensation into layer l+1, rebuild the layers smaller. No data is used.

Chains are found with torch.fx. A layer is prunable only when its BN-ReLU output feeds exactly one
Conv2d/Linear and nothing else: channels that feed a residual add, a concatenation, a pooling or a
flatten are skipped and listed (with the reason) in the report. In a ResNet basic block that means
conv1's channels are pruned (compensated in conv2) and conv2's, which meet the shortcut, are not.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from lowbit.errors import LowbitError
from lowbit.formats.quant_primitives import fake_quantize_affine
from lowbit.prune import compensation as comp
from lowbit.prune import criteria
from lowbit.prune.config import PruneConfig
from lowbit.prune.moments import bn_preactivation_gaussian, rectified_gaussian_moments

_LAYERS = (nn.Conv2d, nn.Linear)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass
class Chain:
    layer: str  # layer l: its output channels are pruned / quantized
    bn: str
    next: str  # layer l+1: its input columns receive the compensation


def _is_relu(node: fx.Node, mods: dict) -> bool:
    if node.op == "call_module":
        return isinstance(mods.get(node.target), nn.ReLU)
    if node.op == "call_function":
        return node.target in (F.relu, torch.relu, torch.relu_)
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _module(node: fx.Node, mods: dict, kinds) -> nn.Module | None:
    if node.op == "call_module" and isinstance(mods.get(node.target), kinds):
        return mods[node.target]
    return None


def _plain_layer(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)


def find_chains(model: nn.Module) -> tuple[list[Chain], dict[str, str]]:
    """(chains in execution order, {layer name: why it is not prunable})."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # fx raises many kinds on dynamic control flow
        raise LowbitError(f"unsupported architecture {type(model).__name__}: cannot trace its graph "
                          f"with torch.fx ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    mods = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    chains, skipped = [], {}
    for node in gm.graph.nodes:
        layer = _module(node, mods, _LAYERS)
        if layer is None:
            continue
        name = node.target

        def skip(why: str) -> None:
            skipped[name] = why

        if not _plain_layer(layer):
            skip("grouped convolution")
            continue
        users = list(node.users)
        bn = _module(users[0], mods, _BNS) if len(users) == 1 else None
        if bn is None:
            skip("not followed by BatchNorm alone")
            continue
        if bn.running_mean is None or bn.running_var is None:
            skip("its BatchNorm keeps no running statistics (the data-free moments need them)")
            continue
        relus = list(users[0].users)
        if len(relus) != 1 or not _is_relu(relus[0], mods):
            skip("its BatchNorm output does not go to a ReLU alone (e.g. a residual add)")
            continue
        nxt_nodes = list(relus[0].users)
        nxt = _module(nxt_nodes[0], mods, _LAYERS) if len(nxt_nodes) == 1 else None
        if nxt is None or not _plain_layer(nxt) or nxt_nodes[0].args[0] is not relus[0]:
            skip("its channels feed something other than one Conv2d/Linear (residual, pooling, flatten, ...)")
            continue
        if any(calls[t] != 1 for t in (name, users[0].target, nxt_nodes[0].target)):
            skip("a module of the chain is called more than once")
            continue
        in_dim = nxt.in_channels if isinstance(nxt, nn.Conv2d) else nxt.in_features
        if in_dim != bn.num_features:
            skip("channel count of the next layer does not match")
            continue
        chains.append(Chain(name, users[0].target, nxt_nodes[0].target))
    return chains, skipped


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _quant(W: torch.Tensor, bits: int | None) -> torch.Tensor:
    """Per-output-channel symmetric RTN (lowbit.formats.quant_primitives), in the weight's shape."""
    if bits is None:
        return W
    return fake_quantize_affine(W.reshape(W.shape[0], -1), bits, True, -1).reshape(W.shape).to(W.dtype)


def _bn_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    n = bn.num_features
    g = bn.weight.detach() if bn.weight is not None else torch.ones(n)
    b = bn.bias.detach() if bn.bias is not None else torch.zeros(n)
    return g, b


def _layer_moments(layer: nn.Module, bn: nn.Module, Wq: torch.Tensor | None) -> comp.JointMoments:
    g, b = _bn_affine(bn)
    mean, cov = bn_preactivation_gaussian(layer.weight.detach(), Wq, g, b)
    return comp.JointMoments.from_joint(rectified_gaussian_moments(mean, cov), layer.weight.shape[0])


def _merge_T(layer: nn.Module, bn: nn.Module, keep: torch.Tensor, prune: torch.Tensor, threshold: float):
    """Neuron Merging (Kim et al. 2020) with BN folded in: pre-activation u_j = f_jᵀ[x; 1] with
    f_j = [γ_j·w_j/σ_j, β_j + γ_j·(b_j − μ_j)/σ_j]. If f_p = s·f_k with s > 0 then a_p = s·a_k exactly, so
    p merges into the kept k of largest cosine with scale ‖f_p‖/‖f_k‖ (when the cosine ≥ threshold)."""
    n = layer.weight.shape[0]
    g, b = _bn_affine(bn)
    sigma = torch.sqrt(bn.running_var + bn.eps).double()
    bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros(n, dtype=torch.float64)
    Wf = layer.weight.detach().double().reshape(n, -1) * (g.double() / sigma)[:, None]
    f = torch.cat([Wf, (b.double() + g.double() * (bias - bn.running_mean.double()) / sigma)[:, None]], 1)
    norms = f.norm(dim=1).clamp_min(1e-300)
    cos = (f[prune] @ f[keep].T) / torch.outer(norms[prune], norms[keep])
    best, partner = cos.max(dim=1) if keep.numel() else (torch.zeros(0), torch.zeros(0, dtype=torch.long))
    scale = torch.where(best >= threshold, norms[prune] / norms[keep][partner], torch.zeros_like(best))
    return comp.merge_T(n, keep, prune, partner, scale)


def _rebuild(model, chain: Chain, keep: torch.Tensor, Wl_new: torch.Tensor, W_next: torch.Tensor,
             next_bias: torch.Tensor | None) -> None:
    layer, bn, nxt = (model.get_submodule(n) for n in (chain.layer, chain.bn, chain.next))
    k = keep.numel()
    if isinstance(layer, nn.Conv2d):
        new = nn.Conv2d(layer.in_channels, k, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                        bias=layer.bias is not None, padding_mode=layer.padding_mode)
    else:
        new = nn.Linear(layer.in_features, k, bias=layer.bias is not None)
    new.weight.data = Wl_new[keep].clone()
    if layer.bias is not None:
        new.bias.data = layer.bias.detach()[keep].clone()
    nbn = type(bn)(k, eps=bn.eps, momentum=bn.momentum, affine=bn.affine, track_running_stats=True)
    if bn.affine:
        nbn.weight.data, nbn.bias.data = bn.weight.detach()[keep].clone(), bn.bias.detach()[keep].clone()
    nbn.running_mean.data, nbn.running_var.data = bn.running_mean[keep].clone(), bn.running_var[keep].clone()
    nbn.num_batches_tracked.data = bn.num_batches_tracked.clone()
    has_bias = next_bias is not None or nxt.bias is not None
    if isinstance(nxt, nn.Conv2d):
        nn2 = nn.Conv2d(k, nxt.out_channels, nxt.kernel_size, nxt.stride, nxt.padding, nxt.dilation,
                        bias=has_bias, padding_mode=nxt.padding_mode)
    else:
        nn2 = nn.Linear(k, nxt.out_features, bias=has_bias)
    nn2.weight.data = W_next
    if has_bias:
        nn2.bias.data = next_bias if next_bias is not None else nxt.bias.detach().clone()
    for name, m in ((chain.layer, new), (chain.bn, nbn), (chain.next, nn2)):
        _set(model, name, m.to(layer.weight.device).eval())


def _check_finite(model: nn.Module) -> None:
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise LowbitError(f"{name}: NaN/inf values in the model; refusing to prune")


def prune_cnn(model: nn.Module, config: PruneConfig) -> tuple[nn.Module, dict]:
    """A pruned (and, with `config.bits`, quantized) copy of `model` and a report. The input is not modified."""
    criteria.check_ratio(config.ratio)
    _check_finite(model)
    chains, skipped = find_chains(model)
    if not chains and config.ratio > 0:
        raise LowbitError(f"unsupported architecture {type(model).__name__}: no Conv/Linear → BatchNorm → ReLU → "
                          "Conv/Linear chain to prune")
    model = copy.deepcopy(model).eval()
    counts = _global_counts(model, chains, config) if config.scope == "global" else None
    report = {"config": config.model_dump(), "layers": [], "skipped": skipped}
    quantized: set[str] = set()
    with torch.no_grad():
        for i, ch in enumerate(chains):
            layer, bn, nxt = (model.get_submodule(n) for n in (ch.layer, ch.bn, ch.next))
            n = layer.weight.shape[0]
            k = counts[i] if counts is not None else criteria.n_pruned(n, config.ratio)
            Wq = _quant(layer.weight.detach(), config.bits)
            jm = _layer_moments(layer, bn, Wq if config.bits else None).centred()
            G = comp.gram(nxt.weight.detach())
            pruned = _select(layer, G, jm, k, config)
            keep = criteria.keep_from_pruned(n, pruned)
            T, shift = _compensation(layer, bn, keep, pruned, G, jm, config)
            W_next = comp.fold(nxt.weight.detach(), T)
            bias = None
            if shift is not None:
                Wsum = nxt.weight.detach().double().reshape(nxt.weight.shape[0], n, -1).sum(-1)
                b0 = nxt.bias.detach().double() if nxt.bias is not None else 0.0
                bias = (b0 + Wsum @ shift).to(nxt.weight.dtype)
            e_none = comp.expected_error(G, jm, keep, comp.identity_T(n, keep))
            e_T = comp.expected_error(G, jm, keep, T)
            energy = comp.output_energy(G, jm)
            _rebuild(model, ch, keep, Wq, W_next, bias)
            quantized.add(ch.layer)
            quantized.discard(ch.next)  # its weight changed: quantized later (as a chain head or at the end)
            report["layers"].append({"layer": ch.layer, "next": ch.next, "channels": n, "kept": keep.numel(),
                                     "pruned": pruned.tolist(), "proxy_rel_error_none": e_none / energy,
                                     "proxy_rel_error": e_T / energy})
        if config.bits:
            for name, m in model.named_modules():
                if isinstance(m, _LAYERS) and name not in quantized:
                    m.weight.data = _quant(m.weight.detach(), config.bits)
    report["parameters"] = sum(p.numel() for p in model.parameters())
    return model, report


def _select(layer, G, jm, k: int, config: PruneConfig) -> torch.Tensor:
    if k == 0:
        return torch.zeros(0, dtype=torch.long)
    if config.criterion == "recon":
        return torch.sort(criteria.recon_order(torch.diagonal(G), jm.aa, k, config.damp)).values
    return criteria.lowest(criteria.norm_scores(layer.weight.detach(), 1 if config.criterion == "l1" else 2), k)


def _compensation(layer, bn, keep, pruned, G, jm, config: PruneConfig):
    """(T, bias shift t₀ or None) for the chosen compensation."""
    n = layer.weight.shape[0]
    if config.compensation == "none":
        return comp.identity_T(n, keep), None
    if config.compensation == "merge":
        return _merge_T(layer, bn, keep, pruned, config.merge_threshold), None
    T = comp.solve_T(G, jm, keep, config.family, config.damp)
    return T, comp.bias_shift(jm, keep, T)


def _global_counts(model, chains: list[Chain], config: PruneConfig) -> list[int]:
    """Per-layer prune counts from one global ranking: norms divided by their layer's mean norm, or the
    one-shot reconstruction cost divided by the layer's output energy tr(G·C)."""
    scores = []
    for ch in chains:
        layer, bn, nxt = (model.get_submodule(n) for n in (ch.layer, ch.bn, ch.next))
        if config.criterion == "recon":
            jm = _layer_moments(layer, bn, None).centred()
            G = comp.gram(nxt.weight.detach())
            scores.append(criteria.recon_scores(torch.diagonal(G), jm.aa, config.damp) / comp.output_energy(G, jm))
        else:
            s = criteria.norm_scores(layer.weight.detach(), 1 if config.criterion == "l1" else 2)
            scores.append(s / s.mean().clamp_min(1e-300))
    return criteria.global_counts(scores, config.ratio)
