"""`QuantLinear`: a drop-in `nn.Linear` that runs a `QuantizedWeight`.

The base weight (grid + outliers) is dequantized once (lazily, in the activation dtype) and cached, or
run by a kernel (`lowbit.kernels.dispatch`); a low-rank term runs as its own branch, y = x·Ŵᵀ + (x·A)·B,
so Ŵ + (AB)ᵀ is never materialised. `QuantizedWeight.dequantize()` stays the reference every path must
match. With `act` set, inputs (and low-rank intermediates) are fake-quantized first (`nn.act_quant`).
An AWQ input scale s (`QuantizedWeight.in_scale`) is folded into the cached base weight Q(W')·diag(s)⁻¹;
kernels, which hold Q(W') itself, take x/s instead (`kernels.dispatch`).
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.formats.quantized_weight import QuantizedWeight
from lowbit.kernels.dispatch import BACKENDS, base_linear, kernel_for, native_lut


class QuantLinear(nn.Module):
    # Base GEMM: "auto" (a CPU kernel for bf16 activations), "reference" or "kernel" (lowbit.kernels.dispatch).
    backend: str = "auto"

    def __init__(self, qweight: QuantizedWeight, bias: torch.Tensor | None = None, act=None):
        super().__init__()
        self.qweight = qweight
        self.out_features, self.in_features = qweight.shape
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.act = act  # ActQuantConfig: fake-quantize the input and the low-rank intermediates (W4A8)
        self._cache: torch.Tensor | None = None  # the *base* weight (grid + outliers), never Ŵ + (AB)ᵀ
        self._lr_cache: tuple | None = None  # (dtype, A, B): the deployed factors

    def _apply(self, fn, recurse=True):
        """`module.to(device)` / `.cuda()` move the quantized weight too (its tensors are not parameters);
        a dtype change never touches it (codes and scales keep their stored types)."""
        super()._apply(fn, recurse)
        device = fn(torch.empty(0, device=self.qweight.device)).device
        if device != self.qweight.device and device.type != "meta":
            self.qweight = self.qweight.to(device)
            self._cache, self._lr_cache = None, None
        return self

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The base weight (grid + outliers, without the low-rank term) in `dtype`, cached."""
        if self._cache is None or self._cache.dtype != dtype:
            self._cache = self.qweight.dequantize(dtype, lowrank=False)
        return self._cache

    def base_gemm(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x·Ŵ_baseᵀ (+ bias): a kernel when one applies, else the cached dequantized base weight."""
        y = base_linear(self, x)
        if y is None:
            return nn.functional.linear(x, self.dequantized_weight(x.dtype), bias)
        return y if bias is None else y + bias

    def lowrank_branch(self, x: torch.Tensor) -> torch.Tensor:
        """(x·A)·B as two small GEMMs (LQER's high-precision branch); with activation quantization both
        intermediates are re-quantized, as the LQER authors' emulation does
        (their quantized linear re-quantizes x·A and its product with B)."""
        if self._lr_cache is None or self._lr_cache[0] != x.dtype:
            A, B = self.qweight.lowrank.factors()
            self._lr_cache = (x.dtype, A.to(x.dtype), B.to(x.dtype))
        _, A, B = self._lr_cache
        if self.act is None:
            return (x @ A) @ B
        from lowbit.nn.act_quant import fake_quantize_act

        return fake_quantize_act(fake_quantize_act(x @ A, self.act) @ B, self.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.act is not None:
            from lowbit.nn.act_quant import fake_quantize_act

            x = fake_quantize_act(x, self.act)
        if getattr(self.qweight.grid, "post_norm", False):
            # OneBit's Post-LN: a parameter-free LayerNorm over the output features, before the bias
            y = self.base_gemm(x)
            if self.qweight.lowrank is not None:
                y = y + self.lowrank_branch(x)
            y = nn.functional.layer_norm(y, (self.out_features,))
            return y if bias is None else y + bias
        if self.qweight.lowrank is None:
            return self.base_gemm(x, bias)
        # y = x·Ŵᵀ + (x·A)·B without materialising Ŵ + (AB)ᵀ
        y = self.base_gemm(x) + self.lowrank_branch(x)
        return y if bias is None else y + bias

    def extra_repr(self) -> str:
        g = self.qweight.grid
        return (f"in_features={self.in_features}, out_features={self.out_features}, grid={g.kind}, "
                f"bits={g.bits}, bpw={self.qweight.bits_per_weight():.3f}"
                + (f", rank={self.qweight.lowrank.A.shape[1]}" if self.qweight.lowrank is not None else "")
                + (f", act={self.act.format}{self.act.bits}" if self.act is not None else ""))


def quantized_weights(model: nn.Module) -> dict[str, QuantizedWeight]:
    """Module name → the QuantizedWeight its QuantLinear runs. The model is the one source of truth of what
    is quantized: the pipeline, the fine-tuning stage and the savers all read it from here."""
    return {n: m.qweight for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` where `name` is in `model`; returns the module that was there."""
    parent, child = get_submodule_parent(model, name)
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def set_backend(model: nn.Module, backend: str) -> dict[str, int]:
    """Set every QuantLinear's backend; returns how many layers each kernel (or the reference) runs."""
    if backend not in BACKENDS:
        raise LowbitError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.backend = backend
            k = "reference" if backend == "reference" else (kernel_for(m.qweight) or "reference")
            k = "reference" if (backend == "auto" and k == "lut" and not native_lut()) else k
            counts[k] = counts.get(k, 0) + 1
    return counts
