"""Exact bit packing of unsigned integer codes into int32 words.

Codes of `bits` bits along the last dimension are laid out as one little-endian bitstream (code i
occupies bits [i·b, (i+1)·b) of the stream, bit 0 of a word first), padded with zeros to whole 32-bit
words. For b ∈ {2, 4, 8} this is exactly the GPTQ `qweight` layout (32/b codes per word, first code in
the lowest bits); for b = 3 it is GPTQ's cross-word 3-bit layout (32 codes in 3 words).
The stored size is therefore ceil(n·b / 32)·32 bits per row, and that is what `bits_per_weight` counts.
"""

from __future__ import annotations

import torch

from lowbit.errors import LowbitError


def packed_words(n: int, bits: int) -> int:
    return -(-n * bits // 32)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., n] unsigned codes < 2^bits → [..., ceil(n·bits/32)] int32 words."""
    if not 1 <= bits <= 8:
        raise LowbitError(f"cannot pack {bits}-bit codes")
    c = codes.to(torch.int64)
    if c.numel() and (c.min() < 0 or c.max() >= 2**bits):
        raise LowbitError(f"codes out of range for {bits}-bit packing")
    *lead, n = c.shape
    words = packed_words(n, bits)
    if 32 % bits == 0:
        # Fast path: whole codes per word, no code straddles a word boundary.
        per = 32 // bits
        c = torch.nn.functional.pad(c, (0, words * per - n)).reshape(*lead, words, per)
        shifts = torch.arange(per, dtype=torch.int64, device=c.device) * bits
        v = (c << shifts).sum(dim=-1)
    else:
        bit_idx = torch.arange(bits, dtype=torch.int64, device=c.device)
        stream = ((c.unsqueeze(-1) >> bit_idx) & 1).reshape(*lead, n * bits)
        stream = torch.nn.functional.pad(stream, (0, words * 32 - n * bits)).reshape(*lead, words, 32)
        v = (stream << torch.arange(32, dtype=torch.int64, device=c.device)).sum(dim=-1)
    # Reinterpret the unsigned 32-bit value as two's-complement int32.
    v = torch.where(v >= 2**31, v - 2**32, v)
    return v.to(torch.int32)


def unpack(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack`: [..., words] int32 → [..., n] uint8 codes."""
    if not 1 <= bits <= 8:
        raise LowbitError(f"cannot unpack {bits}-bit codes")
    if words.shape[-1] != packed_words(n, bits):
        raise LowbitError(
            f"packed tensor has {words.shape[-1]} words per row, {packed_words(n, bits)} expected for "
            f"{n} codes of {bits} bits"
        )
    w = words.to(torch.int64) & 0xFFFFFFFF
    *lead, nw = w.shape
    if 32 % bits == 0:
        per = 32 // bits
        shifts = torch.arange(per, dtype=torch.int64, device=w.device) * bits
        c = ((w.unsqueeze(-1) >> shifts) & (2**bits - 1)).reshape(*lead, nw * per)
        return c[..., :n].to(torch.uint8)
    stream = ((w.unsqueeze(-1) >> torch.arange(32, dtype=torch.int64, device=w.device)) & 1).reshape(*lead, nw * 32)
    stream = stream[..., : n * bits].reshape(*lead, n, bits)
    c = (stream << torch.arange(bits, dtype=torch.int64, device=w.device)).sum(dim=-1)
    return c.to(torch.uint8)
