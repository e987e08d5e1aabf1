"""Swap a model's linear layers for QAT layers (the only module surgery of the QAT package).

Which layers: every linear in the decoder blocks, as `lowbit quantize` chooses them (architecture
adapters; embeddings and lm_head stay in full precision, as in both papers). Initial grids come from
W₀ itself or from a PTQ result (RTN per layer, or GPTQ through the block-by-block pipeline).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.formats.quantized_weight import QuantizedWeight, UniformGrid
from lowbit.methods.config import GPTQConfig, RTNConfig
from lowbit.methods.rtn import rtn_quantize
from lowbit.methods.validate import check_weight
from lowbit.models.adapters import get_adapter, layer_weight
from lowbit.nn.quant_linear import replace_module
from lowbit.qat import grid
from lowbit.qat.config import (L4QConfig, LoQTConfig, LoRAConfig, LRQATConfig, LSQConfig, OneBitConfig, QLoRAConfig,
                               SpIELConfig)
from lowbit.qat.l4q import L4QLinear
from lowbit.qat.loqt import LoQTLinear
from lowbit.qat.lora import LoRALinear
from lowbit.qat.lr_qat import LRQATLinear
from lowbit.qat.onebit import OneBitLinear
from lowbit.qat.spiel import SpIELLinear

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def linear_names(model: nn.Module) -> list[str]:
    adapter = get_adapter(model)
    return [n for bn, b in adapter.blocks(model) for g in adapter.groups(model, bn, b) for n in g]


def ptq_weights(model: nn.Module, cfg, method: str, calib: torch.Tensor | None,
                device: torch.device | None = None) -> dict[str, QuantizedWeight]:
    """The PTQ start: RTN per layer, or GPTQ through the pipeline on a copy (the model is not touched);
    the solver runs on `device`, the weights come back to the host."""
    kw = dict(bits=cfg.bits, group_size=cfg.group_size, symmetric=getattr(cfg, "symmetric", False))
    if method == "rtn":
        return {n: rtn_quantize(layer_weight(model.get_submodule(n)).float().to(device or "cpu"), RTNConfig(**kw)).to("cpu")
                for n in linear_names(model)}
    if calib is None:
        raise LowbitError("GPTQ initialisation needs calibration windows")
    from lowbit.pipeline.calibrate import quantize_model

    return quantize_model(copy.deepcopy(model), GPTQConfig(**kw), calib, progress=False, device=device).qweights


def _plain_grid(qw: QuantizedWeight, name: str) -> UniformGrid:
    g = qw.grid
    if not isinstance(g, UniformGrid) or g.g_idx is not None or qw.outliers is not None or qw.lowrank is not None:
        raise LowbitError(f"{name}: QAT can start only from a plain uniform grid (no g_idx/outliers/low-rank)")
    return g


def _bias(m: nn.Module):
    return getattr(m, "bias", None)


def make_layer(name: str, module: nn.Module, cfg, index: int, seed: int, ptq: QuantizedWeight | None):
    W = layer_weight(module).float()
    check_weight(W, name)
    gen = torch.Generator().manual_seed(seed * 100_003 + index)
    bias = _bias(module)
    if isinstance(cfg, OneBitConfig):
        return OneBitLinear(W, bias, post_norm=cfg.post_norm, latent_init=cfg.latent_init)
    if isinstance(cfg, SpIELConfig):
        if ptq is not None:
            _plain_grid(ptq, name)
        return SpIELLinear(W, bias, density=cfg.density, base=ptq, generator=gen)
    if isinstance(cfg, LoQTConfig):
        return LoQTLinear(W, bias, bits=cfg.bits, group_size=cfg.group_size, rank=cfg.rank, scale=cfg.scale,
                          compensation_iters=cfg.compensation_iters, symmetric=cfg.symmetric,
                          regrid=cfg.regrid)
    bits, gs = cfg.bits, cfg.group_size
    if isinstance(cfg, (L4QConfig, LSQConfig)):
        if ptq is not None:
            g = _plain_grid(ptq, name)
            s_q = g.scale.float()
            b = grid.zero_to_offset(g.zero, s_q, bits)
            # From GPTQ, W₀ := Ŵ so that step 0 is the GPTQ model; from RTN, W₀ stays W (same codes).
            W0 = ptq.dequantize() if cfg.init_from == "gptq" else W
            s = s_q
        else:
            s = grid.l4q_init_scale(W, bits, gs)
            b, W0 = torch.zeros_like(s), W
        lsq = isinstance(cfg, LSQConfig)
        return L4QLinear(W0, bias, s, b, bits=bits, group_size=gs, rank=0 if lsq else cfg.rank, alpha=cfg.alpha,
                         learn_offset=cfg.learn_offset, grad_scale=cfg.grad_scale,
                         base_dtype=None if lsq else _DTYPES[cfg.base_dtype], train_weight=lsq, generator=gen)
    if isinstance(cfg, LRQATConfig):
        g = _plain_grid(ptq, name)
        s0, z0 = g.scale.float(), g.zero
        if cfg.init_from == "gptq":  # Φ₀ = GPTQ's integers: exactly the GPTQ model at step 0
            phi0 = ptq.codes.float() - grid.expand(z0.float(), W.shape, gs)
        else:
            phi0 = W / grid.expand(s0, W.shape, gs)
        return LRQATLinear(phi0, s0, z0, bias, bits=bits, group_size=gs, symmetric=g.symmetric, rank=cfg.rank,
                           alpha=cfg.alpha, phi=cfg.phi, learn_scale=cfg.learn_scale, generator=gen)
    if isinstance(cfg, QLoRAConfig):
        return LoRALinear.on_quantized(ptq, bias, rank=cfg.rank, alpha=cfg.alpha, generator=gen,
                                       factor_kind="int8" if cfg.adapter_dtype == "int8" else "float")
    if isinstance(cfg, LoRAConfig):
        return LoRALinear(W, bias, rank=cfg.rank, alpha=cfg.alpha, generator=gen)
    raise LowbitError(f"unknown QAT config {type(cfg).__name__}")


def needs_ptq(cfg) -> str | None:
    """'rtn' / 'gptq' when the method starts from a PTQ result, else None."""
    if isinstance(cfg, QLoRAConfig):
        return cfg.init_from
    if isinstance(cfg, SpIELConfig):
        return None if cfg.base == "fp" else cfg.base
    if isinstance(cfg, LRQATConfig):
        return "gptq" if cfg.init_from == "gptq" else "rtn"
    if isinstance(cfg, (L4QConfig, LSQConfig)) and cfg.init_from != "none":
        return cfg.init_from
    return None


def prepare_model(model: nn.Module, cfg, *, seed: int = 0, ptq: dict[str, QuantizedWeight] | None = None,
                  ) -> dict[str, nn.Module]:
    """Replace every selected linear of `model` (in place) by its QAT layer; freeze everything else.

    Returns {name: QAT layer}. `ptq` holds the PTQ start when `needs_ptq(cfg)`.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    layers = {}
    for i, name in enumerate(linear_names(model)):
        module = model.get_submodule(name)
        layer = make_layer(name, module, cfg, i, seed, None if ptq is None else ptq[name])
        replace_module(model, name, layer)
        layers[name] = layer
    return layers


def trainable(layers: dict[str, nn.Module]) -> tuple[dict[str, nn.Parameter], dict[str, nn.Parameter]]:
    """({name: adapter / weight parameter}, {name: step / offset parameter}) that require grad, in layer order."""
    main, quant = {}, {}
    for lname, layer in layers.items():
        for pname, p in layer.named_parameters(recurse=False):
            if p.requires_grad:
                (quant if pname in ("s", "b") else main)[f"{lname}.{pname}"] = p
    return main, quant
