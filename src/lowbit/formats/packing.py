"""Exact bit packing of unsigned integer codes into int32 words.

Codes of `bits` bits along the last dimension are laid out as one little-endian bitstream (code i
occupies bits [i·b, (i+1)·b) of the stream, bit 0 of a word first), padded with zeros to whole 32-bit
words. For b ∈ {2, 4, 8} this is exactly the GPTQ `qweight` layout (32/b codes per word, first code in
the lowest bits); for b = 3 it is GPTQ's cross-word 3-bit layout (32 codes in 3 words).
The stored size is therefore ceil(n·b / 32)·32 bits per row, and that is what `bits_per_weight` counts.
"""

from __future__ import annotations

import math
import sys

import torch

from lowbit.errors import LowbitError


def packed_words(n: int, bits: int) -> int:
    return -(-n * bits // 32)


# Rows per chunk: temporaries stay a few MB, so a 3B model's 110 MB layers cost the same per code as
# small ones (one big temporary per call meant an mmap + page faults per call: time grew faster than size).
_CHUNK_CODES = 1 << 21


def _row_chunks(rows: int, n: int):
    step = max(1, _CHUNK_CODES // max(n, 1))
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


def _slots(bits: int):
    """Where each of 32 consecutive codes lands in its `bits` words: (code j, word k, shift s, spills).

    Code j starts at stream bit o = j·b: word k = o // 32, shift s = o % 32; when s + b > 32 its high
    bits continue at the bottom of word k + 1. 32 codes fill exactly b words, so the pattern repeats."""
    for j in range(32):
        k, s = divmod(j * bits, 32)
        yield j, k, s, s + bits > 32


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., n] unsigned codes < 2^bits → [..., ceil(n·bits/32)] int32 words."""
    if not 1 <= bits <= 8:
        raise LowbitError(f"cannot pack {bits}-bit codes")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2**bits):
        raise LowbitError(f"codes out of range for {bits}-bit packing")
    *lead, n = codes.shape
    words = packed_words(n, bits)
    flat = codes.reshape(math.prod(lead), n)
    out = torch.empty(flat.shape[0], words, dtype=torch.int32, device=codes.device)
    if out.numel() == 0:
        return out.reshape(*lead, words)
    if 8 % bits == 0 and sys.byteorder == "little":
        _pack_bytes(flat, bits, out)
        return out.reshape(*lead, words)
    nblk = -(-n // 32)  # blocks of 32 codes → `bits` words each
    for r0, r1 in _row_chunks(flat.shape[0], n):
        c = torch.nn.functional.pad(flat[r0:r1].to(torch.int64), (0, nblk * 32 - n)).view(r1 - r0, nblk, 32)
        w = torch.zeros(r1 - r0, nblk, bits, dtype=torch.int64, device=codes.device)
        for j, k, s, spills in _slots(bits):
            w[..., k] |= c[..., j] << s
            if spills:
                w[..., k + 1] |= c[..., j] >> (32 - s)
        w = w.view(r1 - r0, nblk * bits)[:, :words] & 0xFFFFFFFF
        # Reinterpret the unsigned 32-bit value as two's-complement int32.
        out[r0:r1] = torch.where(w >= 2**31, w - 2**32, w)
    return out.reshape(*lead, words)


def unpack(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack`: [..., words] int32 → [..., n] uint8 codes."""
    if not 1 <= bits <= 8:
        raise LowbitError(f"cannot unpack {bits}-bit codes")
    if words.shape[-1] != packed_words(n, bits):
        raise LowbitError(
            f"packed tensor has {words.shape[-1]} words per row, {packed_words(n, bits)} expected for "
            f"{n} codes of {bits} bits"
        )
    *lead, nw = words.shape
    flat = words.reshape(math.prod(lead), nw)
    out = torch.empty(flat.shape[0], n, dtype=torch.uint8, device=words.device)
    if out.numel() == 0:
        return out.reshape(*lead, n)
    if 8 % bits == 0 and sys.byteorder == "little":
        _unpack_bytes(flat, bits, out)
        return out.reshape(*lead, n)
    nblk, mask = -(-n // 32), 2**bits - 1
    for r0, r1 in _row_chunks(flat.shape[0], n):
        w = torch.nn.functional.pad(flat[r0:r1].to(torch.int64) & 0xFFFFFFFF, (0, nblk * bits - nw))
        w = w.view(r1 - r0, nblk, bits)
        c = torch.empty(r1 - r0, nblk, 32, dtype=torch.int64, device=words.device)
        for j, k, s, spills in _slots(bits):
            v = w[..., k] >> s
            if spills:
                v = v | (w[..., k + 1] << (32 - s))
            c[..., j] = v & mask
        out[r0:r1] = c.view(r1 - r0, nblk * 32)[:, :n]
    return out.reshape(*lead, n)


# Widths that divide 8 (1, 2, 4, 8 bits) fill whole bytes, and a little-endian int32 word is its four bytes
# lowest first: the same bitstream is built in uint8 and reinterpreted, ~10× faster than int64 words.


def _pack_bytes(flat: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    rows, n = flat.shape
    per = 8 // bits
    nbytes = out.shape[1] * 4
    for r0, r1 in _row_chunks(rows, n):
        c = torch.nn.functional.pad(flat[r0:r1].to(torch.uint8), (0, nbytes * per - n)).view(r1 - r0, nbytes, per)
        b = c[..., 0].clone(memory_format=torch.contiguous_format)
        for j in range(1, per):
            b |= c[..., j] << (j * bits)
        out[r0:r1] = b.view(torch.int32)


def _unpack_bytes(flat: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    rows, n = out.shape
    per, mask = 8 // bits, 2**bits - 1
    for r0, r1 in _row_chunks(rows, n):
        b = flat[r0:r1].contiguous().view(torch.uint8)
        c = torch.empty(r1 - r0, b.shape[1], per, dtype=torch.uint8, device=flat.device)
        for j in range(per):
            c[..., j] = (b >> (j * bits)) & mask
        out[r0:r1] = c.view(r1 - r0, -1)[:, :n]
