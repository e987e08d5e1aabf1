"""ggml's K-quant blocks (and the 32-weight Q5_0 / Q8_0 blocks they fall back to), encoded from float weights
with an importance weight per element, and decoded.

Layouts (ggml-common.h; one row of `cols` weights is cols/256 super-blocks, or cols/32 blocks):

    Q4_K  144 B / 256: fp16 d, fp16 dmin, 12 B of 6-bit (scale, min) for 8 sub-blocks of 32, 128 B of nibbles
          ŵ = d·sc_j·q − dmin·m_j, q ∈ [0, 15]                                        4.5 bits/weight
    Q5_K  176 B / 256: as Q4_K plus 32 B holding the codes' fifth bits; q ∈ [0, 31]        5.5 bits/weight
    Q6_K  210 B / 256: 128 B low nibbles, 64 B high 2-bit pairs, 16 int8 scales (sub-blocks of 16), fp16 d
          ŵ = d·sc_j·(q − 32), q ∈ [0, 63]                                             6.5625 bits/weight
    Q5_0   22 B / 32:  fp16 d, 32 high bits, 16 B of nibbles;  ŵ = d·(q − 16), q ∈ [0, 31]   5.5 bits/weight
    Q5_1   24 B / 32:  fp16 d, fp16 m, 32 high bits, 16 B;    ŵ = d·q + m, q ∈ [0, 31]         6 bits/weight
    Q8_0   34 B / 32:  fp16 d, 32 int8;                         ŵ = d·q                     8.5 bits/weight

Byte order inside a block (the readers of llama.cpp, gguf-py and transformers rely on it):
Q4_K scales: bytes 0–3 hold sc_0..3 in their low 6 bits and the high 2 bits of sc_4..7 on top; bytes 4–7
the same for the mins; bytes 8–11 the low nibbles of sc_4..7 (low half) and of m_4..7 (high half). Q4_K
codes: byte 32c + i holds weight i of sub-block 2c (low nibble) and of sub-block 2c+1 (high nibble);
Q5_K's fifth bit of weight i of sub-block s is bit s of byte i of its 32 high-bit bytes.
Q6_K code of position P = 128h + p: low nibble in byte 64h + p mod 64 (low half when p < 64), high two
bits in byte 32h + p mod 32 at bit 2·(p div 32). Q5_0: byte j holds q_j (low) and q_{j+16} (high)
nibbles; bit j of the little-endian 32-bit qh is q_j's fifth bit (Q5_1 the same, after d and m).

The fit, per sub-block, minimises Σ w·(x − ŵ)² (w: importance, e.g. an activation second moment per
input column — the diagonal of the layer's Hessian, llama.cpp's "imatrix"), the way ggml's reference
quantizer searches: a few candidate inverse scales around the min-max one, each followed by the weighted
least-squares scale (and offset) for the codes it gives; then the sub-block scales are quantized to 6
(Q4_K) or 8 (Q6_K) bits against one fp16 super-block scale, and the codes are re-rounded against the
scales as stored.
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError

QK_K = 256
# type → (weights per block, bytes per block)
BLOCKS = {"Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210), "Q5_0": (32, 22), "Q5_1": (32, 24),
          "Q8_0": (32, 34)}


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


def encode(W: torch.Tensor, qtype: str, importance: torch.Tensor | None = None) -> torch.Tensor:
    """W [rows, cols] → uint8 [rows, cols / n · bytes] in `qtype`'s block layout. `importance` [cols] ≥ 0."""
    rows, cols = _check(W, qtype, importance)
    n, nbytes = BLOCKS[qtype]
    x = W.detach().float().reshape(rows, cols // n, n)
    imp = None if importance is None else importance.float().reshape(1, cols // n, n)
    out = {"Q4_K": lambda a, b: _encode_k_affine(a, b, 4), "Q5_K": lambda a, b: _encode_k_affine(a, b, 5),
           "Q6_K": _encode_q6_k, "Q5_0": _encode_q5_0, "Q5_1": _encode_q5_1, "Q8_0": _encode_q8_0}[qtype](x, imp)
    assert out.shape[-1] == nbytes
    return out.reshape(rows, -1)


def _encode_k_affine(x: torch.Tensor, imp: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Q4_K (bits 4) / Q5_K (bits 5): 8 sub-blocks of 32 with 6-bit scales and mins under fp16 d, dmin."""
    R, nb, _ = x.shape
    nmax = 2**bits - 1
    xs = x.reshape(R, nb, 8, 32)
    w = _weights(xs, None if imp is None else imp.reshape(1, nb, 8, 32))
    s, b = fit_affine(xs, w, nmax)
    m = -b  # ≥ 0
    d, dmin = _h(s.amax(-1) / 63), _h(m.amax(-1) / 63)  # [R, nb]
    sc = torch.where(d[..., None] > 0, torch.round(s / d[..., None].clamp_min(1e-30)), 0).clamp(0, 63)
    mq = torch.where(dmin[..., None] > 0, torch.round(m / dmin[..., None].clamp_min(1e-30)), 0).clamp(0, 63)
    step, off = (d[..., None] * sc)[..., None], (dmin[..., None] * mq)[..., None]
    q = torch.where(step > 0, torch.round((xs + off) / step.clamp_min(1e-30)), 0).clamp(0, nmax).to(torch.uint8)
    sc, mq = sc.to(torch.uint8), mq.to(torch.uint8)
    scales = torch.empty(R, nb, 12, dtype=torch.uint8)
    scales[..., 0:4] = (sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6)
    scales[..., 4:8] = (mq[..., :4] & 63) | ((mq[..., 4:] >> 4) << 6)
    scales[..., 8:12] = (sc[..., 4:] & 15) | ((mq[..., 4:] & 15) << 4)
    lo = q & 15
    qs = (lo[:, :, 0::2] | (lo[:, :, 1::2] << 4)).reshape(R, nb, 128)  # chunk c: sub-blocks 2c (low), 2c+1 (high)
    parts = [_fp16_bytes(d), _fp16_bytes(dmin), scales]
    if bits == 5:
        hi = (q >> 4).to(torch.int32)  # [R, nb, 8, 32]: bit s of byte i is sub-block s's weight i
        parts.append((hi << torch.arange(8, dtype=torch.int32)[:, None]).sum(2).to(torch.uint8))
    return torch.cat([*parts, qs], dim=-1)


def _encode_q6_k(x: torch.Tensor, imp: torch.Tensor | None) -> torch.Tensor:
    R, nb, _ = x.shape
    xs = x.reshape(R, nb, 16, 16)
    w = _weights(xs, None if imp is None else imp.reshape(1, nb, 16, 16))
    s = fit_symmetric(xs, w, 32)  # [R, nb, 16], signed
    idx = s.abs().argmax(-1, keepdim=True)
    smax = torch.gather(s, -1, idx).squeeze(-1)
    zero = smax == 0
    iscale = torch.where(zero, 0.0, -128.0 / torch.where(zero, 1.0, smax))
    d = _h(torch.where(zero, 0.0, 1.0 / torch.where(zero, 1.0, iscale)))
    sc = torch.round(iscale[..., None] * s).clamp(-128, 127)
    step = (d[..., None] * sc)[..., None]
    q = torch.where(step != 0, torch.round(xs / torch.where(step == 0, 1.0, step)), 0).clamp(-32, 31) + 32
    q = q.to(torch.uint8).reshape(R, nb, 2, 128)  # halves h of 128 positions
    ql = (q[..., :64] & 15) | ((q[..., 64:] & 15) << 4)  # [R, nb, 2, 64]
    hi = q >> 4
    qh = hi[..., 0:32] | (hi[..., 32:64] << 2) | (hi[..., 64:96] << 4) | (hi[..., 96:128] << 6)  # [R, nb, 2, 32]
    scales = sc.to(torch.int8).view(torch.uint8)
    return torch.cat([ql.reshape(R, nb, 128), qh.reshape(R, nb, 64), scales, _fp16_bytes(d)], dim=-1)


def _encode_q5_0(x: torch.Tensor, imp: torch.Tensor | None) -> torch.Tensor:
    R, nb, _ = x.shape
    d = _h(fit_symmetric(x, _weights(x, imp), 16))  # [R, nb]
    step = d[..., None]
    q = torch.where(step != 0, torch.round(x / torch.where(step == 0, 1.0, step)), 0).clamp(-16, 15) + 16
    return torch.cat([_fp16_bytes(d), _high_bits(q), _nibbles(q)], dim=-1)


def _encode_q5_1(x: torch.Tensor, imp: torch.Tensor | None) -> torch.Tensor:
    s, b = fit_affine(x, _weights(x, imp), 31, nonpositive_offset=False)
    d, m = _h(s), _h(b)
    step = d[..., None]
    q = torch.where(step > 0, torch.round((x - m[..., None]) / step.clamp_min(1e-30)), 0).clamp(0, 31)
    return torch.cat([_fp16_bytes(d), _fp16_bytes(m), _high_bits(q), _nibbles(q)], dim=-1)


def _encode_q8_0(x: torch.Tensor, imp: torch.Tensor | None) -> torch.Tensor:
    d = _h(x.abs().amax(-1) / 127)
    step = d[..., None]
    q = torch.where(step > 0, torch.round(x / step.clamp_min(1e-30)), 0).clamp(-127, 127)
    return torch.cat([_fp16_bytes(d), q.to(torch.int8).view(torch.uint8)], dim=-1)


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
