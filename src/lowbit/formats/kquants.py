"""ggml's K-quant blocks (and the 32-weight Q5_0 / Q8_0 blocks they fall back to), encoded from float weights
with an importance weight per element, and decoded.

Layouts (ggml-common.h; one row of `cols` weights is cols/256 super-blocks, or cols/32 blocks):

    Q2_K   84 B / 256: 16 bytes (4-bit scale | 4-bit min << 4) for 16 sub-blocks of 16, 64 B of 2-bit codes,
          fp16 d, fp16 dmin;  ŵ = d·sc_j·q − dmin·m_j, q ∈ [0, 3]                       2.625 bits/weight
    Q3_K  110 B / 256: 32 B high bits, 64 B low 2-bit pairs, 12 B of 6-bit signed scales (sub-blocks of
          16), fp16 d;  ŵ = d·(u_j − 32)·(q − 4), q ∈ [0, 7]                             3.4375 bits/weight
    Q4_K  144 B / 256: fp16 d, fp16 dmin, 12 B of 6-bit (scale, min) for 8 sub-blocks of 32, 128 B of nibbles
          ŵ = d·sc_j·q − dmin·m_j, q ∈ [0, 15]                                        4.5 bits/weight
    Q5_K  176 B / 256: as Q4_K plus 32 B holding the codes' fifth bits; q ∈ [0, 31]        5.5 bits/weight
    Q6_K  210 B / 256: 128 B low nibbles, 64 B high 2-bit pairs, 16 int8 scales (sub-blocks of 16), fp16 d
          ŵ = d·sc_j·(q − 32), q ∈ [0, 63]                                             6.5625 bits/weight
    Q4_0   18 B / 32:  fp16 d, 16 B of nibbles;              ŵ = d·(q − 8), q ∈ [0, 15]      4.5 bits/weight
    Q5_0   22 B / 32:  fp16 d, 32 high bits, 16 B of nibbles;  ŵ = d·(q − 16), q ∈ [0, 31]   5.5 bits/weight
    Q5_1   24 B / 32:  fp16 d, fp16 m, 32 high bits, 16 B;    ŵ = d·q + m, q ∈ [0, 31]         6 bits/weight
    Q8_0   34 B / 32:  fp16 d, 32 int8;                         ŵ = d·q                     8.5 bits/weight

Byte order inside a block (the readers of llama.cpp, gguf-py and transformers rely on it):
Q4_K scales: bytes 0–3 hold sc_0..3 in their low 6 bits and the high 2 bits of sc_4..7 on top; bytes 4–7
the same for the mins; bytes 8–11 the low nibbles of sc_4..7 (low half) and of m_4..7 (high half). Q4_K
codes: byte 32c + i holds weight i of sub-block 2c (low nibble) and of sub-block 2c+1 (high nibble);
Q5_K's fifth bit of weight i of sub-block s is bit s of byte i of its 32 high-bit bytes.
Q6_K code of position P = 128h + p: low nibble in byte 64h + p mod 64 (low half when p < 64), high two
bits in byte 32h + p mod 32 at bit 2·(p div 32). Q2_K / Q3_K two-bit codes: position 128h + 32k + l in
byte 32h + l at bit 2k; Q3_K's third bit of position 32k + m is bit k of hmask byte m; its scale u_j (6
bits) has its low nibble in byte j (j < 8, low half) or j − 8 (high half) and its top two bits in byte
8 + j mod 4 at bit 2·(j div 4); Q2_K's scale byte j is sc_j | m_j << 4. Q4_0 / Q5_0: byte j holds q_j (low) and q_{j+16} (high)
nibbles; bit j of the little-endian 32-bit qh is q_j's fifth bit (Q5_1 the same, after d and m).

The fit, per sub-block, minimises Σ w·(x − ŵ)² (w: importance, e.g. an activation second moment per
input column — the diagonal of the layer's Hessian, llama.cpp's "imatrix"), the way ggml's reference
quantizer searches: a few candidate inverse scales around the min-max one, each followed by the weighted
least-squares scale (and offset) for the codes it gives; then the sub-block scales are quantized to 6
(Q4_K) or 8 (Q6_K) bits against one fp16 super-block scale, and the codes are re-rounded against the
scales as stored. `fit` (the scales, a `BlockFit`) and `pack` (codes + scales → bytes) are separate, so a
solver can choose the codes against the stored scales (`methods.gptq_blocks`); `encode` is fit, round, pack.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError

QK_K = 256
# type → (weights per block, bytes per block)
BLOCKS = {"Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210), "Q4_0": (32, 18),
          "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34)}


def bits_per_weight(qtype: str) -> float:
    n, b = BLOCKS[qtype]
    return 8 * b / n


def _h(x: torch.Tensor) -> torch.Tensor:
    """fp16-rounded, back in float32 (what a block stores)."""
    return x.to(torch.float16).float()


def _fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(*x.shape, 2)


def _high_bits(q: torch.Tensor) -> torch.Tensor:
    """Q5_0 / Q5_1: the fifth bits of 32 codes [..., 32] as a little-endian 32-bit word, 4 bytes [..., 4]."""
    qh = ((q.to(torch.int64) >> 4) << torch.arange(32)).sum(-1)
    return torch.stack([(qh >> (8 * k)) & 255 for k in range(4)], dim=-1).to(torch.uint8)


def _read_high_bits(b: torch.Tensor) -> torch.Tensor:
    """Inverse of `_high_bits`: 4 bytes [..., 4] → each code's fifth bit, already at 16 [..., 32]."""
    h = sum(b[..., k].long() << (8 * k) for k in range(4))
    return ((h[..., None] >> torch.arange(32)) & 1) << 4


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """32 codes [..., 32] → 16 bytes: q_j in the low and q_{j+16} in the high nibble of byte j."""
    q = q.to(torch.int64)
    return ((q[..., :16] & 15) | ((q[..., 16:] & 15) << 4)).to(torch.uint8)


def _wsum(w, a):
    return (w * a).sum(-1, keepdim=True)


def fit_affine(x: torch.Tensor, w: torch.Tensor, nmax: int, nstep: int = 20, rmin: float = -1.0,
               rdelta: float = 0.1, nonpositive_offset: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per vector of the last dim: (scale ≥ 0, offset) with ŵ = scale·L + offset, L ∈ [0, nmax] integer,
    minimising Σ w(x − ŵ)² over the candidate inverse scales (nmax + rmin + rdelta·i)/(max − min). The
    K-quants store the offset as a non-negative min subtracted (offset ≤ 0); Q5_1 stores any offset."""
    lo = x.amin(-1, keepdim=True)
    if nonpositive_offset:
        lo = lo.clamp(max=0)
    span = x.amax(-1, keepdim=True) - lo
    flat = span <= 0
    span = torch.where(flat, torch.ones_like(span), span)
    # the min-max grid is the first candidate; the least-squares refits are kept inside [0, 2·span/nmax] for
    # the scale and [lo − scale, 0] for the offset: with a few dominant weights the 2×2 system is nearly
    # singular, and an extreme (scale, offset) would also spoil the super-block scales shared with it
    best_s, best_b = span / nmax, lo
    L0 = torch.round((x - lo) / best_s).clamp(0, nmax)
    best_err = _wsum(w, (best_s * L0 + best_b - x) ** 2)
    for i in range(nstep + 1):
        L = torch.round((nmax + rmin + rdelta * i) / span * (x - lo)).clamp(0, nmax)
        sw, sl, sl2, sx, sxl = _wsum(w, 1.0), _wsum(w, L), _wsum(w, L * L), _wsum(w, x), _wsum(w, x * L)
        D = sw * sl2 - sl * sl
        ok = D > 0
        Ds = torch.where(ok, D, torch.ones_like(D))
        s = torch.where(ok, (sw * sxl - sx * sl) / Ds, best_s)
        b = torch.where(ok, (sl2 * sx - sl * sxl) / Ds, best_b)
        pos = (b > 0) & nonpositive_offset  # an offset that must be ≤ 0 is not: refit the scale alone
        s = torch.where(pos, sxl / sl2.clamp_min(1e-30), s)
        b = torch.where(pos, torch.zeros_like(b), b)
        s = torch.minimum(s.clamp_min(0), 2 * span / nmax)
        b = torch.maximum(b, lo - s)
        err = _wsum(w, (s * L + b - x) ** 2)
        better = err < best_err
        best_s, best_b, best_err = (torch.where(better, s, best_s), torch.where(better, b, best_b),
                                    torch.where(better, err, best_err))
    best_s = torch.where(flat, torch.zeros_like(best_s), best_s)
    return best_s.squeeze(-1), torch.where(flat, lo, best_b).squeeze(-1)


def fit_symmetric(x: torch.Tensor, w: torch.Tensor, nmax: int, nstep: int = 9) -> torch.Tensor:
    """Per vector: a signed scale s with ŵ = s·L, L ∈ [−nmax, nmax − 1], the largest-|x| entry mapped near
    −nmax (the asymmetric end, as ggml does); candidates −(nmax + 0.1·i)/x_max, i ∈ [−nstep, nstep]."""
    idx = x.abs().argmax(-1, keepdim=True)
    xmax = torch.gather(x, -1, idx)
    zero = xmax == 0
    xmax = torch.where(zero, torch.ones_like(xmax), xmax)
    best_s = -xmax / nmax  # the plain grid first; refits kept within twice its step (see fit_affine)
    best_err = _wsum(w, (best_s * torch.round(x / best_s).clamp(-nmax, nmax - 1) - x) ** 2)
    for i in range(-nstep, nstep + 1):
        L = torch.round(-(nmax + 0.1 * i) / xmax * x).clamp(-nmax, nmax - 1)
        sl2 = _wsum(w, L * L)
        s = _wsum(w, x * L) / sl2.clamp_min(1e-30)
        s = s.clamp(-2 * xmax.abs() / nmax, 2 * xmax.abs() / nmax)
        err = _wsum(w, (s * L - x) ** 2)
        better = err < best_err
        best_s, best_err = torch.where(better, s, best_s), torch.where(better, err, best_err)
    return torch.where(zero, torch.zeros_like(best_s), best_s).squeeze(-1)


def _weights(x: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
    """Importance per element: the per-column `importance` (floored at 1e-6 of its mean so that a column no
    token reached still counts a little), else ggml's default |x| + rms(x) of the block."""
    if importance is None:
        return x.abs() + x.square().mean(-1, keepdim=True).sqrt()
    imp = importance.float()
    return (imp + 1e-6 * imp.mean().clamp_min(1e-30)).expand_as(x)


def _check(W: torch.Tensor, qtype: str, importance: torch.Tensor | None) -> tuple[int, int]:
    if qtype not in BLOCKS:
        raise LowbitError(f"unknown ggml block type {qtype!r}: choose {', '.join(BLOCKS)}")
    if W.ndim != 2:
        raise LowbitError(f"{qtype}: expected a 2-D weight, got {tuple(W.shape)}")
    rows, cols = W.shape
    n = BLOCKS[qtype][0]
    if cols % n:
        raise LowbitError(f"{qtype} needs rows of a multiple of {n} weights, got {cols}")
    if not torch.isfinite(W).all():
        raise LowbitError(f"{qtype}: the weight has NaN/inf entries")
    if importance is not None and (importance.shape != (cols,) or not bool((importance >= 0).all())):
        raise LowbitError(f"importance must be {cols} non-negative values, got {tuple(importance.shape)}")
    return rows, cols


def _crumbs(a: torch.Tensor) -> torch.Tensor:
    """Four 2-bit fields [..., 4, n] → bytes [..., n]: field k at bit 2k."""
    a = a.to(torch.uint8)
    return a[..., 0, :] | (a[..., 1, :] << 2) | (a[..., 2, :] << 4) | (a[..., 3, :] << 6)


def _bit_planes(bits: torch.Tensor) -> torch.Tensor:
    """Eight 1-bit fields [..., 8, n] → bytes [..., n]: field s at bit s (Q3_K's hmask, Q5_K's fifth bits)."""
    return (bits.to(torch.int32) << torch.arange(8, dtype=torch.int32)[:, None]).sum(-2).to(torch.uint8)


def _two_bit_planes(L: torch.Tensor) -> torch.Tensor:
    """Q2_K / Q3_K: 256 two-bit codes [..., 256] → 64 bytes; position 128h + 32k + l at bit 2k of byte 32h + l."""
    return _crumbs(L.reshape(*L.shape[:-1], 2, 4, 32)).reshape(*L.shape[:-1], 64)


def _read_two_bit_planes(qs: torch.Tensor) -> torch.Tensor:
    qs = qs.long().reshape(*qs.shape[:-1], 2, 1, 32)
    return ((qs >> (2 * torch.arange(4))[:, None]) & 3).reshape(*qs.shape[:-3], 256)


@dataclass
class BlockFit:
    """The scales of `qtype` fitted to a weight [rows, cols], the codes still free: every element is
    ŵ = step·q − off with an unsigned code q ∈ [0, nmax] (signed types carry their shift in `off`, e.g.
    Q6_K's off = 32·step). `step`, `off` [rows, nb, S]: one per sub-block of n/S weights; `header`: the
    stored scale fields that `pack` writes beside the codes. Splitting the fit from the rounding lets a
    solver choose the codes against fixed block scales (`gptq_codes`)."""

    qtype: str
    step: torch.Tensor
    off: torch.Tensor
    nmax: int
    header: dict[str, torch.Tensor]

    def per_element(self, t: torch.Tensor) -> torch.Tensor:
        R, nb, S = t.shape
        return t.repeat_interleave(BLOCKS[self.qtype][0] // S, dim=-1).reshape(R, -1)

    def round(self, W: torch.Tensor) -> torch.Tensor:
        """Nearest codes for W [rows, cols] under these scales (uint8)."""
        step, off = self.per_element(self.step), self.per_element(self.off)
        ok = step != 0
        q = torch.round((W.float() + off) / torch.where(ok, step, torch.ones_like(step)))
        return torch.where(ok, q, torch.zeros_like(q)).clamp(0, self.nmax).to(torch.uint8)


def fit(W: torch.Tensor, qtype: str, importance: torch.Tensor | None = None) -> BlockFit:
    """Fit `qtype`'s block scales to W [rows, cols] minimising Σ importance·(w − ŵ)² per sub-block."""
    rows, cols = _check(W, qtype, importance)
    n = BLOCKS[qtype][0]
    x = W.detach().float().reshape(rows, cols // n, n)
    imp = None if importance is None else importance.float().reshape(1, cols // n, n)
    return _FIT[qtype](x, imp)


def pack(f: BlockFit, codes: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, cols / n · bytes] in `f.qtype`'s block layout, for codes [rows, cols] ∈ [0, nmax]."""
    n, nbytes = BLOCKS[f.qtype]
    R, nb = f.step.shape[:2]
    if codes.shape != (R, nb * n) or int(codes.max()) > f.nmax:
        raise LowbitError(f"{f.qtype}: codes {tuple(codes.shape)} do not fit the block fit ({R}×{nb * n}, "
                          f"≤ {f.nmax})")
    out = _PACK[f.qtype](f.header, codes.reshape(R, nb, n))
    assert out.shape[-1] == nbytes
    return out.reshape(R, -1)


def encode(W: torch.Tensor, qtype: str, importance: torch.Tensor | None = None) -> torch.Tensor:
    """W [rows, cols] → uint8 [rows, cols / n · bytes] in `qtype`'s block layout, each code the nearest under
    the fitted scales. `importance` [cols] ≥ 0."""
    f = fit(W, qtype, importance)
    return pack(f, f.round(W))


def _sub(x: torch.Tensor, imp: torch.Tensor | None, size: int):
    R, nb, n = x.shape
    xs = x.reshape(R, nb, n // size, size)
    return xs, _weights(xs, None if imp is None else imp.reshape(1, nb, n // size, size))


def _quantize_scales(v: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative sub-block values v [.., S] → (fp16 super-block scale [..], integer levels [.., S] ≤ top)."""
    d = _h(v.amax(-1) / top)
    lev = torch.where(d[..., None] > 0, torch.round(v / d[..., None].clamp_min(1e-30)), 0).clamp(0, top)
    return d, lev


def _signed_scales(s: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed sub-block scales s [.., S] → (fp16 d, integer levels in [−top, top − 1]): the largest |s| maps
    to −top (ggml's Q3_K / Q6_K)."""
    smax = torch.gather(s, -1, s.abs().argmax(-1, keepdim=True)).squeeze(-1)
    zero = smax == 0
    iscale = torch.where(zero, 0.0, -float(top) / torch.where(zero, 1.0, smax))
    d = _h(torch.where(zero, 0.0, 1.0 / torch.where(zero, 1.0, iscale)))
    return d, torch.round(iscale[..., None] * s).clamp(-top, top - 1)


def _fit_q2_k(x, imp) -> BlockFit:
    """16 sub-blocks of 16, a 4-bit scale and min each under fp16 d, dmin (ggml's search: rmin −0.5, 15 steps)."""
    xs, w = _sub(x, imp, 16)
    s, b = fit_affine(xs, w, 3, nstep=15, rmin=-0.5)
    (d, sc), (dmin, mq) = _quantize_scales(s, 15), _quantize_scales(-b, 15)
    return BlockFit("Q2_K", d[..., None] * sc, dmin[..., None] * mq, 3, {"d": d, "dmin": dmin, "sc": sc, "m": mq})


def _pack_q2_k(h, q):
    scales = h["sc"].to(torch.uint8) | (h["m"].to(torch.uint8) << 4)
    return torch.cat([scales, _two_bit_planes(q), _fp16_bytes(h["d"]), _fp16_bytes(h["dmin"])], dim=-1)


def _fit_q3_k(x, imp) -> BlockFit:
    """16 symmetric sub-blocks of 16, codes in [−4, 3], 6-bit signed scales under one fp16 d."""
    xs, w = _sub(x, imp, 16)
    d, sc = _signed_scales(fit_symmetric(xs, w, 4), 32)
    step = d[..., None] * sc
    return BlockFit("Q3_K", step, 4 * step, 7, {"d": d, "sc": sc})


def _pack_q3_k(h, q):
    R, nb, _ = q.shape
    hmask = _bit_planes((q >> 2).reshape(R, nb, 8, 32))  # bit k of byte m: position 32k + m
    u = (h["sc"] + 32).to(torch.uint8)  # [R, nb, 16]
    scales = torch.empty(R, nb, 12, dtype=torch.uint8)
    scales[..., 0:8] = (u[..., 0:8] & 15) | ((u[..., 8:16] & 15) << 4)
    scales[..., 8:12] = _crumbs((u >> 4).reshape(R, nb, 4, 4))  # [.., j div 4, j mod 4]
    return torch.cat([hmask, _two_bit_planes(q & 3), scales, _fp16_bytes(h["d"])], dim=-1)


def _fit_k_affine(x, imp, bits: int) -> BlockFit:
    """Q4_K (bits 4) / Q5_K (bits 5): 8 sub-blocks of 32 with 6-bit scales and mins under fp16 d, dmin."""
    xs, w = _sub(x, imp, 32)
    nmax = 2**bits - 1
    s, b = fit_affine(xs, w, nmax)
    (d, sc), (dmin, mq) = _quantize_scales(s, 63), _quantize_scales(-b, 63)  # the offset is ≤ 0: m = −b ≥ 0
    return BlockFit(f"Q{bits}_K", d[..., None] * sc, dmin[..., None] * mq, nmax,
                    {"d": d, "dmin": dmin, "sc": sc, "m": mq})


def _pack_k_affine(h, q):
    R, nb, _ = q.shape
    q = q.reshape(R, nb, 8, 32)
    sc, mq = h["sc"].to(torch.uint8), h["m"].to(torch.uint8)
    scales = torch.empty(R, nb, 12, dtype=torch.uint8)
    scales[..., 0:4] = (sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6)
    scales[..., 4:8] = (mq[..., :4] & 63) | ((mq[..., 4:] >> 4) << 6)
    scales[..., 8:12] = (sc[..., 4:] & 15) | ((mq[..., 4:] & 15) << 4)
    lo = q & 15
    qs = (lo[:, :, 0::2] | (lo[:, :, 1::2] << 4)).reshape(R, nb, 128)  # chunk c: sub-blocks 2c (low), 2c+1 (high)
    return torch.cat([_fp16_bytes(h["d"]), _fp16_bytes(h["dmin"]), scales, qs], dim=-1)


def _pack_q5_k(h, q):
    R, nb, _ = q.shape
    out = _pack_k_affine(h, q & 15)  # the Q4_K layout, then the fifth bits inserted after the scales:
    qh = _bit_planes(q.reshape(R, nb, 8, 32) >> 4)  # bit s of high-bit byte i is sub-block s's weight i
    return torch.cat([out[..., :16], qh, out[..., 16:]], dim=-1)


def _fit_q6_k(x, imp) -> BlockFit:
    xs, w = _sub(x, imp, 16)
    d, sc = _signed_scales(fit_symmetric(xs, w, 32), 128)
    step = d[..., None] * sc
    return BlockFit("Q6_K", step, 32 * step, 63, {"d": d, "sc": sc})


def _pack_q6_k(h, q):
    R, nb, _ = q.shape
    q = q.reshape(R, nb, 2, 128)  # halves h of 128 positions
    ql = (q[..., :64] & 15) | ((q[..., 64:] & 15) << 4)  # [R, nb, 2, 64]
    qh = _crumbs((q >> 4).reshape(R, nb, 2, 4, 32))  # [R, nb, 2, 32]
    scales = h["sc"].to(torch.int8).view(torch.uint8)
    return torch.cat([ql.reshape(R, nb, 128), qh.reshape(R, nb, 64), scales, _fp16_bytes(h["d"])], dim=-1)


def _fit_symmetric_block(qtype: str, half: int):
    """Q4_0 (half 8) / Q5_0 (half 16): one fp16 d per 32, ŵ = d·(q − half)."""
    def f(x, imp) -> BlockFit:
        d = _h(fit_symmetric(x, _weights(x, imp), half))[..., None]  # [R, nb, 1]
        return BlockFit(qtype, d, half * d, 2 * half - 1, {"d": d[..., 0]})
    return f


def _pack_q4_0(h, q):
    return torch.cat([_fp16_bytes(h["d"]), _nibbles(q)], dim=-1)


def _pack_q5_0(h, q):
    return torch.cat([_fp16_bytes(h["d"]), _high_bits(q), _nibbles(q)], dim=-1)


def _fit_q5_1(x, imp) -> BlockFit:
    s, b = fit_affine(x, _weights(x, imp), 31, nonpositive_offset=False)
    d, m = _h(s), _h(b)
    return BlockFit("Q5_1", d[..., None], -m[..., None], 31, {"d": d, "m": m})


def _pack_q5_1(h, q):
    return torch.cat([_fp16_bytes(h["d"]), _fp16_bytes(h["m"]), _high_bits(q), _nibbles(q)], dim=-1)


def _fit_q8_0(x, imp) -> BlockFit:
    d = _h(x.abs().amax(-1) / 127)[..., None]
    return BlockFit("Q8_0", d, 127 * d, 254, {"d": d[..., 0]})  # q ∈ [0, 254] is the int8 q − 127 ∈ [−127, 127]


def _pack_q8_0(h, q):
    return torch.cat([_fp16_bytes(h["d"]), (q.to(torch.int16) - 127).to(torch.int8).view(torch.uint8)], dim=-1)


_FIT = {"Q2_K": _fit_q2_k, "Q3_K": _fit_q3_k, "Q4_K": lambda x, i: _fit_k_affine(x, i, 4),
        "Q5_K": lambda x, i: _fit_k_affine(x, i, 5), "Q6_K": _fit_q6_k, "Q4_0": _fit_symmetric_block("Q4_0", 8),
        "Q5_0": _fit_symmetric_block("Q5_0", 16), "Q5_1": _fit_q5_1, "Q8_0": _fit_q8_0}
_PACK = {"Q2_K": _pack_q2_k, "Q3_K": _pack_q3_k, "Q4_K": _pack_k_affine, "Q5_K": _pack_q5_k, "Q6_K": _pack_q6_k,
         "Q4_0": _pack_q4_0, "Q5_0": _pack_q5_0, "Q5_1": _pack_q5_1, "Q8_0": _pack_q8_0}


def decode(data: torch.Tensor, qtype: str, cols: int) -> torch.Tensor:
    """Inverse of `encode` (exactly ggml's dequantization): uint8 [rows, bytes] → float32 [rows, cols]."""
    if qtype not in BLOCKS:
        raise LowbitError(f"unknown ggml block type {qtype!r}")
    n, nbytes = BLOCKS[qtype]
    rows = data.shape[0]
    if cols % n or data.shape[1] != cols // n * nbytes:
        raise LowbitError(f"{qtype}: {data.shape[1]} bytes per row do not hold {cols} weights")
    b = data.reshape(rows, cols // n, nbytes)
    f16 = lambda t: t.contiguous().view(torch.float16).float().squeeze(-1)  # noqa: E731
    if qtype == "Q8_0":
        return (f16(b[..., :2])[..., None] * b[..., 2:].contiguous().view(torch.int8).float()).reshape(rows, cols)
    if qtype == "Q4_0":
        qs = b[..., 2:].long()
        return (f16(b[..., :2])[..., None] * (torch.cat([qs & 15, qs >> 4], dim=-1) - 8).float()).reshape(rows, cols)
    if qtype == "Q2_K":
        sb, q = b[..., 0:16].long(), _read_two_bit_planes(b[..., 16:80]).reshape(rows, -1, 16, 16).float()
        d, dmin = f16(b[..., 80:82]), f16(b[..., 82:84])
        w = d[..., None, None] * (sb & 15)[..., None].float() * q - dmin[..., None, None] * (sb >> 4)[..., None].float()
        return w.reshape(rows, cols)
    if qtype == "Q3_K":
        hm, sb, d = b[..., 0:32].long(), b[..., 96:108].long(), f16(b[..., 108:110])
        high = ((hm[..., None, :] >> torch.arange(8)[:, None]) & 1).reshape(rows, -1, 256)
        q = (_read_two_bit_planes(b[..., 32:96]) | (high << 2)) - 4
        top = torch.stack([(sb[..., 8:12] >> (2 * k)) & 3 for k in range(4)], dim=-2).reshape(rows, -1, 16)
        u = torch.cat([sb[..., 0:8] & 15, sb[..., 0:8] >> 4], dim=-1) | (top << 4)
        w = d[..., None, None] * (u - 32)[..., None].float() * q.reshape(rows, -1, 16, 16).float()
        return w.reshape(rows, cols)
    if qtype in ("Q5_0", "Q5_1"):
        d, m = f16(b[..., :2]), (f16(b[..., 2:4]) if qtype == "Q5_1" else None)
        qs = b[..., -16:].long()
        q = torch.cat([qs & 15, qs >> 4], dim=-1) | _read_high_bits(b[..., -20:-16])
        if m is None:  # Q5_0: ŵ = d·(q − 16)
            return (d[..., None] * (q - 16).float()).reshape(rows, cols)
        return (d[..., None] * q.float() + m[..., None]).reshape(rows, cols)
    if qtype in ("Q4_K", "Q5_K"):
        d, dmin, sb = f16(b[..., 0:2]), f16(b[..., 2:4]), b[..., 4:16].long()
        sc = torch.cat([sb[..., 0:4] & 63, (sb[..., 8:12] & 15) | ((sb[..., 0:4] >> 6) << 4)], dim=-1)
        m = torch.cat([sb[..., 4:8] & 63, (sb[..., 8:12] >> 4) | ((sb[..., 4:8] >> 6) << 4)], dim=-1)
        qs = b[..., -128:].long().reshape(rows, -1, 4, 32)
        q = torch.stack([qs & 15, qs >> 4], dim=3).reshape(rows, -1, 8, 32)
        if qtype == "Q5_K":
            qh = b[..., 16:48].long()  # [rows, nb, 32]
            q = q | (((qh[:, :, None, :] >> torch.arange(8)[:, None]) & 1) << 4)
        q = q.float()
        w = d[..., None, None] * sc[..., None].float() * q - dmin[..., None, None] * m[..., None].float()
        return w.reshape(rows, cols)
    ql, qh = b[..., :128].long().reshape(rows, -1, 2, 64), b[..., 128:192].long().reshape(rows, -1, 2, 32)
    sc, d = b[..., 192:208].contiguous().view(torch.int8).float(), f16(b[..., 208:210])
    lo = torch.cat([ql & 15, ql >> 4], dim=-1)  # [rows, nb, 2, 128]
    hi = torch.cat([(qh >> (2 * k)) & 3 for k in range(4)], dim=-1)
    q = ((lo | (hi << 4)) - 32).float().reshape(rows, -1, 16, 16)
    return (d[..., None, None] * sc[..., None] * q).reshape(rows, cols)
