"""SqueezeLLM-style non-uniform quantization (Kim et al., ICML 2024, arXiv 2306.07629), dense part only.

One codebook of 2^b centroids per output row, from weighted 1-D k-means

    min_C Σ_j F_rj (W_rj − C(W_rj))²

The paper's weights are the diagonal Fisher information F = E[g²] of the full model (one backward pass
over calibration data). Here F_rj = H_jj = 2·E[x_j²], the diagonal of the layer-wise Hessian the
pipeline already collects: the sensitivity of the layer output ‖X(W − Ŵ)ᵀ‖² to a change of W_rj
alone. No error feedback between columns (unlike GPTQ / CLAQ); no dense-and-sparse split.
The codebooks share CLAQ's storage (`formats.codebook`, axis "row") and k-means (`methods.kmeans`).
"""

from __future__ import annotations

import torch

from lowbit.formats.codebook import encode_codebook, make_codebook_grid
from lowbit.formats.quantized_weight import QuantizedWeight
from lowbit.methods.config import SqueezeLLMConfig
from lowbit.methods.kmeans import kmeans_1d, nearest
from lowbit.methods.validate import check_hessian, check_weight


def squeezellm_quantize(W: torch.Tensor, hessian: torch.Tensor | None, cfg: SqueezeLLMConfig) -> QuantizedWeight:
    check_weight(W)
    rows, cols = W.shape
    weights = None
    if cfg.weighting == "hessian-diag":
        check_hessian(hessian, cols)
        d = torch.diagonal(hessian).float().clamp(min=0)
        weights = d[None, :].expand(rows, cols).contiguous()
    km = cfg.kmeans
    K = 2**cfg.bits
    c = kmeans_1d(W.float(), K, weights, init=km.init, max_iter=km.max_iter, tol=km.tol, seed=km.seed).centroids
    lut, q, s, lo = encode_codebook(c, cfg.codebook_bits)
    codes = nearest(W.float(), lut.float()).to(torch.uint8)
    grid = make_codebook_grid("row", torch.full((rows,), cfg.bits, dtype=torch.uint8), lut, cfg.codebook_bits, q, s, lo)
    return QuantizedWeight(W.shape, W.dtype, grid, codes)
