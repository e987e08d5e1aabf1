"""Round-to-nearest (RTN): every weight snaps to the nearest level of a min-max grid. No data."""

from __future__ import annotations

import torch

from lowbit.formats.quant_primitives import (
    affine_qparams,
    affine_quantize_groups,
    mxint_quantize,
)
from lowbit.formats.quantized_weight import MXIntGrid, QuantizedWeight, UniformGrid
from lowbit.methods.config import RTNConfig
from lowbit.methods.outliers import fit_view, reserve_mask, take_outliers
from lowbit.methods.validate import check_weight


def rtn_quantize(W: torch.Tensor, config: RTNConfig) -> QuantizedWeight:
    check_weight(W)
    if config.format == "mxint":
        m, e = mxint_quantize(W, config.bits, config.block_size, config.exp_bits)
        codes = (m.to(torch.int16) + 2 ** (config.bits - 1)).to(torch.uint8)
        grid = MXIntGrid(config.bits, config.block_size, e, config.exp_bits)
        return QuantizedWeight(W.shape, W.dtype, grid, codes)
    # Outlier reservation: the grid is fitted without the reserved entries, which are stored in fp16.
    mask = reserve_mask(W, config.outliers, config.group_size, config.outlier_rule) if config.outliers else None
    scale, zero = affine_qparams(W if mask is None else fit_view(W, mask), config.bits, config.symmetric,
                                 config.group_size)
    codes = affine_quantize_groups(W, scale, zero, config.bits, config.group_size)
    grid = UniformGrid(config.bits, config.group_size, config.symmetric, scale, zero)
    return QuantizedWeight(W.shape, W.dtype, grid, codes, None if mask is None else take_outliers(W, mask))
