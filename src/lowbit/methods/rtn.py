"""Round-to-nearest (RTN): every weight snaps to the nearest level of a min-max grid. No data."""

from __future__ import annotations

import torch

from lowbit.formats.quant_primitives import (
    affine_qparams,
    affine_quantize,
    expand_group_param,
    mxint_quantize,
)
from lowbit.formats.quantized_weight import MXIntGrid, QuantizedWeight, UniformGrid
from lowbit.methods.config import RTNConfig
from lowbit.methods.validate import check_weight


def rtn_quantize(W: torch.Tensor, config: RTNConfig) -> QuantizedWeight:
    check_weight(W)
    if config.format == "mxint":
        m, e = mxint_quantize(W, config.bits, config.block_size, config.exp_bits)
        codes = (m.to(torch.int16) + 2 ** (config.bits - 1)).to(torch.uint8)
        grid = MXIntGrid(config.bits, config.block_size, e, config.exp_bits)
        return QuantizedWeight(W.shape, W.dtype, grid, codes)
    scale, zero = affine_qparams(W, config.bits, config.symmetric, config.group_size)
    s = expand_group_param(scale, W.shape, config.group_size)
    z = expand_group_param(zero, W.shape, config.group_size)
    codes = affine_quantize(W, s, z, config.bits)
    grid = UniformGrid(config.bits, config.group_size, config.symmetric, scale, zero)
    return QuantizedWeight(W.shape, W.dtype, grid, codes)
