"""Pure quantization primitives: number grids as tensor math, no modules, no files.

Two families:

* **Uniform affine integers** (RTN, GPTQ, AWQ, L4Q export): q = clamp(round(w / s) + z, 0, 2^b − 1),
  ŵ = (q − z)·s, one (s, z) per group of `group_size` consecutive input columns. Conventions follow
  the GPTQ reference code (`quant.py`), because GPTQ checkpoints are what runtimes load:
  min/max always include 0; symmetric grids use the fixed zero point z = 2^(b−1) and
  s = 2·max|w| / (2^b − 1); an all-zero group gets the range [−1, 1].
  The scale is rounded to float16 *before* the codes are chosen, so the stored scale is the one the
  codes were fitted to and `dequantize` reproduces exactly what the algorithm saw.

* **MXINT block floating point** (LQER/L²QER): one power-of-two exponent shared by a block of
  `block_size` consecutive elements, elements in sign-magnitude with `bits` bits
  (1 sign + bits−1 magnitude). Exact rules of the LQER authors' emulator (`block_fp.py` in the LQER repository):
  e = ceil(log2 max|x|) clamped to the 8-bit biased range, x̂ = sign(x)·2^e·
  clamp(round(|x|·2^(b−1)/2^e), 0, 2^(b−1)−1)/2^(b−1). A block whose maximum is exactly a power of two
  therefore loses one step at the top (max 1.0 → 0.875 for MXINT4); that is the authors' behaviour.

Granularity for uniform grids, by `group_size`: −1 per output channel, 0 per tensor, g > 0 groups of g
consecutive input columns. When g does not divide the input dimension the last group is partial (it
holds in mod g columns and has its own scale and zero), as in GPTQ/AutoGPTQ, AutoRound and llama.cpp
practice: 576 columns in groups of 128 are four groups of 128 and one of 64, so a model's default group
size works on any layer. Group-local math runs on `group_pieces`: the full groups as one [R, G, g] view
and the partial group as a second [R, 1, r] view, so a partial group is computed exactly as a group of
its own size would be (no padding to mask out).
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError

SCALE_DTYPE = torch.float16
SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise LowbitError(f"unsupported bit width {bits}: choose one of {SUPPORTED_BITS}")


def n_groups(in_features: int, group_size: int) -> int:
    """Number of scale groups along the input dimension: ⌈in / g⌉ (1 for per-channel and per-tensor)."""
    if group_size in (-1, 0):
        return 1
    if group_size < 0:
        raise LowbitError(f"group size {group_size} is invalid: use -1 (per channel), 0 (per tensor) or > 0")
    return -(-in_features // group_size)


def group_pieces(w: torch.Tensor, group_size: int) -> list[torch.Tensor]:
    """[rows, cols] as views [rows, G_i, g_i] covering the columns in order: the full groups, then the
    partial last group when g does not divide cols (per tensor: one [1, 1, rows·cols] piece)."""
    rows, cols = w.shape
    if group_size == 0:
        return [w.reshape(1, 1, rows * cols)]
    g = cols if group_size == -1 else min(group_size, cols)
    full = cols // g * g
    pieces = [w[:, :full].reshape(rows, cols // g, g)] if full else []
    if full < cols:
        pieces.append(w[:, full:].reshape(rows, 1, cols - full))
    return pieces


def per_group(fn, w: torch.Tensor, group_size: int) -> torch.Tensor:
    """fn applied to every piece of `group_pieces` ([R, G_i, g_i] → [R, G_i, ...]), joined: [R, G, ...]."""
    return torch.cat([fn(p) for p in group_pieces(w, group_size)], dim=1)


def per_entry(fn, w: torch.Tensor, group_size: int) -> torch.Tensor:
    """fn applied to every piece ([R, G_i, g_i] → same shape), joined back to w's [rows, cols] layout."""
    out = [fn(p) for p in group_pieces(w, group_size)]
    if group_size == 0:
        return out[0].reshape(w.shape)
    return torch.cat([o.reshape(w.shape[0], -1) for o in out], dim=1)


def affine_qparams(
    w: torch.Tensor, bits: int, symmetric: bool, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale and zero point per group: (scale fp16 [R, G], zero int32 [R, G]).

    R = rows (1 for per tensor), G = groups. The zero of a symmetric grid is the constant 2^(b−1).
    """
    check_bits(bits)
    n_groups(w.shape[1], group_size)
    maxq = 2**bits - 1
    wf = w.float()
    xmin = per_group(lambda p: p.amin(dim=-1), wf, group_size).clamp(max=0)
    xmax = per_group(lambda p: p.amax(dim=-1), wf, group_size).clamp(min=0)
    if symmetric:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    dead = (xmin == 0) & (xmax == 0)
    xmin = torch.where(dead, -1.0, xmin)
    xmax = torch.where(dead, 1.0, xmax)
    # Rounded to the stored dtype first: codes are fitted to the scale that will be deployed.
    scale = ((xmax - xmin) / maxq).to(SCALE_DTYPE)
    # Floor at the smallest fp16 subnormal (2^-24), not the smallest normal: tiny-range groups keep a
    # min-max grid instead of a needlessly coarse one.
    scale = scale.clamp(min=2.0**-24)
    if symmetric:
        zero = torch.full_like(scale, (maxq + 1) // 2, dtype=torch.int32)
    else:
        zero = torch.round(-xmin / scale.float()).clamp(0, maxq).to(torch.int32)
    return scale, zero


def expand_group_param(p: torch.Tensor, shape: torch.Size, group_size: int, g_idx: torch.Tensor | None = None):
    """Broadcast a per-group parameter [R, G] to the weight shape [rows, cols].

    `g_idx[c]` names the group of input column c (GPTQ act-order with dynamic groups); without it the
    group of column c is c // group_size (the last group may be partial).
    """
    rows, cols = shape
    if g_idx is not None:
        return p.expand(rows, -1)[:, g_idx] if p.shape[0] == 1 else p[:, g_idx]
    if group_size == 0:
        return p.expand(rows, cols)
    g = cols if group_size == -1 else group_size
    return p.repeat_interleave(g, dim=1)[:, :cols].expand(rows, cols)


def affine_quantize(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
) -> torch.Tensor:
    """Codes q = clamp(round(w/s) + z, 0, 2^b − 1) with s, z already broadcast to w's shape."""
    q = torch.round(w.float() / scale.float()) + zero
    return q.clamp_(0, 2**bits - 1).to(torch.uint8)


# Rows per chunk of `affine_quantize_groups`: ~2M elements keep every temporary a few MB, so the cost per
# weight does not grow with the layer (one full-size fp32 temporary per step meant page faults per call).
_CHUNK_ELEMENTS = 1 << 21


def affine_quantize_groups(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                           group_size: int, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """`affine_quantize` with per-group (scale, zero) [R, G] (R = 1 for per tensor) broadcast a few rows at
    a time: the same codes, without materialising the broadcast parameters for the whole weight."""
    rows, cols = w.shape
    codes = torch.empty(rows, cols, dtype=torch.uint8, device=w.device)
    step = max(1, _CHUNK_ELEMENTS // max(cols, 1))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        s, z = (scale, zero) if scale.shape[0] == 1 else (scale[r0:r1], zero[r0:r1])
        shape = torch.Size((r1 - r0, cols))
        codes[r0:r1] = affine_quantize(w[r0:r1], expand_group_param(s, shape, group_size, g_idx),
                                       expand_group_param(z, shape, group_size, g_idx), bits)
    return codes


def affine_dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """ŵ = (q − z)·s in float32 (s, z broadcast to the codes' shape)."""
    return (codes.to(torch.int32) - zero).float() * scale.float()


def fake_quantize_affine(w: torch.Tensor, bits: int, symmetric: bool, group_size: int) -> torch.Tensor:
    """Round-to-nearest onto the min-max grid and back, in float32 (the RTN reference)."""
    scale, zero = affine_qparams(w, bits, symmetric, group_size)
    s = expand_group_param(scale, w.shape, group_size)
    z = expand_group_param(zero, w.shape, group_size)
    return affine_dequantize(affine_quantize(w, s, z, bits), s, z)


# --------------------------------------------------------------------------------------------------
# MXINT block floating point


def mxint_exponent_range(exp_bits: int) -> tuple[int, int]:
    """Unbiased exponent range of a biased `exp_bits` exponent: [−(2^(e−1) − 1), 2^(e−1)]."""
    return -(2 ** (exp_bits - 1) - 1), 2 ** (exp_bits - 1)


def mxint_quantize(
    x: torch.Tensor, bits: int, block_size: int, exp_bits: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks of `block_size` along the last dim → (codes int8 sign-magnitude value, exponent int16).

    Codes are the signed integers m ∈ [−(2^(b−1)−1), 2^(b−1)−1]; x̂ = m · 2^(e − (b−1)).
    """
    if not 2 <= bits <= 8:
        raise LowbitError(f"unsupported MXINT width {bits}: choose 2..8")
    if block_size < 1:
        raise LowbitError(f"MXINT block size {block_size} must be positive")
    n = x.shape[-1]
    # A short last block: zero padding leaves its max|x|, hence its exponent and codes, unchanged.
    xb = _blocks(x.float(), block_size)
    lo, hi = mxint_exponent_range(exp_bits)
    amax = xb.abs().amax(dim=-1, keepdim=True)
    # log2(0) = −inf clamps to the smallest exponent; every element of such a block is 0 anyway.
    e = torch.ceil(torch.log2(amax)).clamp(lo, hi)
    mmax = 2 ** (bits - 1) - 1
    # |x|·2^−e first (≤ 1, exact), then ·2^(b−1): a single factor 2^(b−1−e) overflows float32 to inf
    # at e = −127 (all-zero or tiny blocks), giving 0·inf = NaN codes and wrong codes for tiny values.
    mag = torch.round(xb.abs() * torch.exp2(-e) * 2 ** (bits - 1)).clamp(0, mmax)
    codes = (torch.sign(xb) * mag).to(torch.int8).flatten(-2)[..., :n]
    return codes, e.squeeze(-1).to(torch.int16)


def _blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """[..., n] → [..., ⌈n/b⌉, b], the last block zero-padded when b does not divide n."""
    n = x.shape[-1]
    x = torch.nn.functional.pad(x, (0, -n % block_size))
    return x.reshape(*x.shape[:-1], x.shape[-1] // block_size, block_size)


def mxint_dequantize(codes: torch.Tensor, exponent: torch.Tensor, bits: int, block_size: int) -> torch.Tensor:
    cb = _blocks(codes.float(), block_size)
    step = torch.exp2(exponent.float() - (bits - 1)).unsqueeze(-1)
    return (cb * step).flatten(-2)[..., :codes.shape[-1]]


def fake_quantize_mxint(x: torch.Tensor, bits: int, block_size: int, exp_bits: int = 8) -> torch.Tensor:
    codes, e = mxint_quantize(x, bits, block_size, exp_bits)
    return mxint_dequantize(codes, e, bits, block_size).to(x.dtype)
