"""`QuantLinear`: a drop-in `nn.Linear` that runs a `QuantizedWeight`.

This is the pure-torch reference path: the weight is dequantized once (lazily, in the activation dtype)
and cached, so evaluation costs one GEMM per call. Faster kernels (int4/int8 weight-only, LUT, the
low-rank branch as two small GEMMs) are optional accelerations that must match `dequantize()`.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.formats.quantized_weight import QuantizedWeight


class QuantLinear(nn.Module):
    def __init__(self, qweight: QuantizedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.qweight = qweight
        self.out_features, self.in_features = qweight.shape
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._cache: torch.Tensor | None = None

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        if self._cache is None or self._cache.dtype != dtype:
            self._cache = self.qweight.dequantize(dtype)
        return self._cache

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.dequantized_weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        g = self.qweight.grid
        return (f"in_features={self.in_features}, out_features={self.out_features}, grid={g.kind}, "
                f"bits={g.bits}, bpw={self.qweight.bits_per_weight():.3f}")


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` where `name` is in `model`; returns the module that was there."""
    parent, child = get_submodule_parent(model, name)
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old
