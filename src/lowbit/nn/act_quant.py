"""Activation fake quantization for LQER's W4A8 / W4A6 settings (notes §1.3 step 10, §1.4).

Per token, blocks of `block_size` consecutive features share one power-of-two exponent (MXINT, the exact
rounding rules of `formats.quant_primitives.mxint_quantize`): x̂ = Q_X(x). A feature dimension that the
block does not divide (e.g. a rank-8 intermediate with blocks of 16) gets a short last block: it is
zero-padded, and zeros change neither a block's max|x| nor any other element.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from lowbit.formats.quant_primitives import fake_quantize_mxint


def fake_quantize_act(x: torch.Tensor, cfg) -> torch.Tensor:
    """Q_X(x) along the last dim (per token), in x's dtype. `cfg`: an ActQuantConfig."""
    n = x.shape[-1]
    pad = -n % cfg.block_size
    xp = F.pad(x, (0, pad)) if pad else x
    y = fake_quantize_mxint(xp, cfg.bits, cfg.block_size, cfg.exp_bits)
    return y[..., :n] if pad else y
