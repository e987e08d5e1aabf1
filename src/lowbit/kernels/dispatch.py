"""Which kernel runs a `QuantLinear`'s base GEMM, chosen by its `backend` setting.

* `reference`: always the pure-torch path (dequantize once, cache, `F.linear`). Exact; the yardstick.
* `auto` (default): the int4 / int8 / LUT kernels when they apply *and* the activations are bf16 (where
  the ATen ops are fast), the reference otherwise. fp32 evaluation therefore stays bit-identical to the
  reference. The LUT path is chosen only when its native matvec built (`kernels.lut_native`): without
  it the LUT path saves memory but is ~100× slower than the cached dequantized weight.
* `kernel`: a kernel whenever one applies; fp32/fp16 activations are cast to bf16 for it and the output
  back. Layers no kernel can run (MXINT, outliers, act-order g_idx, odd shapes) use the reference.

A kernel computes the grid part x·Ŵ_gridᵀ only (for an AWQ layer with `in_scale` s: (x/s)·Q(W·diag s)ᵀ,
the input divided before the op); the caller adds the low-rank branch (x·A)·B and the
bias. Packed operands are built at the first call and kept on the module (`_kernel_state`).
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.kernels import cpu

BACKENDS = ("auto", "reference", "kernel")


def kernel_for(qw) -> str | None:
    """'int4' | 'int8' | 'lut' | None for a QuantizedWeight (outliers need the reference path)."""
    if qw.outliers is not None:
        return None
    if cpu.int4_reason(qw) is None:
        return "int4"
    if cpu.int8_reason(qw) is None:
        return "int8"
    from lowbit.kernels import lut

    if lut.lut_reason(qw) is None:
        return "lut"
    return None


def native_lut() -> bool:
    """Whether the native LUT matvec built (without it the LUT path is slower than the reference)."""
    from lowbit.kernels import lut_native

    return lut_native.library() is not None


def _state(module: nn.Module, dtype: torch.dtype):
    st = getattr(module, "_kernel_state", None)
    if st is not None and st[0] == dtype:
        return st
    qw = module.qweight
    kind = kernel_for(qw)
    if kind == "int4":
        st = (dtype, kind, cpu.prepare_int4(qw, dtype))
    elif kind == "int8":
        st = (dtype, kind, cpu.prepare_int8(qw, dtype))
    elif kind == "lut":
        from lowbit.kernels import lut

        st = (dtype, kind, lut.prepare_lut(qw, dtype))
    else:
        st = (dtype, None, None)
    module._kernel_state = st
    return st


def base_linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """x·Ŵ_gridᵀ through a kernel, or None when the reference path must run."""
    backend = getattr(module, "backend", "auto")
    if backend == "reference" or (backend == "auto" and x.dtype != torch.bfloat16) or x.device.type != "cpu":
        return None  # (the int4 / int8 / LUT ops here are CPU ops)
    if backend == "auto":
        if getattr(module, "_auto_kind", "?") == "?":
            module._auto_kind = kernel_for(module.qweight)
        if module._auto_kind is None or (module._auto_kind == "lut" and not native_lut()):
            return None
    _, kind, packed = _state(module, torch.bfloat16)
    if kind is None:
        return None
    s = module.qweight.in_scale
    if s is not None:  # AWQ: the kernel holds Q(W·diag s), so it multiplies x/s (in x's dtype)
        x = x / s.to(x.dtype)
    xb = x if x.dtype == torch.bfloat16 else x.to(torch.bfloat16)
    if kind == "int4":
        y = cpu.int4_mm(xb, packed)
    elif kind == "int8":
        y = cpu.int8_mm(xb, packed)
    else:
        from lowbit.kernels import lut

        y = lut.lut_mm(xb, packed)
    return y if y.dtype == x.dtype else y.to(x.dtype)
