"""Bit packing: exact round trips, hand-computed words, GPTQ's layouts, and error handling.

Layout under test: one LSB-first bitstream per row — code i occupies stream bits [i·b, (i+1)·b),
stream bit k is bit k mod 32 of word k // 32 — zero-padded to whole int32 words.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats.packing import pack, packed_words, unpack


def s32(u: int) -> int:
    """Unsigned 32-bit value → the signed int32 with the same bits."""
    return u - 2**32 if u >= 2**31 else u


def ref_pack(codes: list[int], bits: int) -> list[int]:
    """Independent bitstream packer (pure Python ints)."""
    stream = 0
    for i, c in enumerate(codes):
        stream |= c << (i * bits)
    n_words = -(-len(codes) * bits // 32)
    return [s32((stream >> (32 * k)) & 0xFFFFFFFF) for k in range(n_words)]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 31, 32, 33, 100, 129])
def test_round_trip_and_reference(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 2**bits, (3, 5, n), generator=g, dtype=torch.int64)
    codes[0, 0, 0] = 0
    codes[0, 0, -1] = 2**bits - 1  # extremes
    codes[1, 2, :] = 2**bits - 1  # an all-ones row: every padding bit must stay 0
    codes = codes.to(torch.uint8)
    words = pack(codes, bits)
    assert words.dtype == torch.int32
    assert words.shape == (3, 5, packed_words(n, bits)) == (3, 5, -(-n * bits // 32))
    out = unpack(words, bits, n)
    assert out.dtype == torch.uint8 and torch.equal(out, codes)
    for idx in [(0, 0), (1, 2), (2, 4)]:
        assert words[idx].tolist() == ref_pack(codes[idx].tolist(), bits)


def test_known_words_4bit():
    w = pack(torch.tensor([1, 2, 3, 4, 5, 6, 7, 8]), 4)
    assert w.tolist() == [s32(0x87654321)] == [-2023406815]
    # 9 codes → 2 words, the 9th in the low nibble of word 1
    assert pack(torch.tensor([0xF] * 8 + [0xA]), 4).tolist() == [-1, 0xA]


def test_known_words_2bit_and_8bit():
    # 2-bit: 0,1,2,3 repeated → 0b11_10_01_00 per byte = 0xE4E4E4E4
    assert pack(torch.tensor([0, 1, 2, 3] * 4), 2).tolist() == [s32(0xE4E4E4E4)]
    assert pack(torch.tensor([3] + [0] * 15), 2).tolist() == [3]
    assert pack(torch.tensor([0] * 15 + [2]), 2).tolist() == [s32(0x80000000)]
    # 8-bit: bytes little-endian within the word
    assert pack(torch.tensor([0x01, 0x23, 0x45, 0x67]), 8).tolist() == [0x67452301]
    assert pack(torch.tensor([0xFF, 0, 0, 0x80], dtype=torch.uint8), 8).tolist() == [s32(0x800000FF)]
    assert pack(torch.tensor([0xAB]), 8).tolist() == [0xAB]


def test_hand_computed_3bit_and_5bit_streams():
    # 3-bit [7, 0, 5]: bits 0–2 = 111, 3–5 = 000, 6–8 = 101 → 7 + 5·2^6 = 327, one word
    assert pack(torch.tensor([7, 0, 5]), 3).tolist() == [327]
    # 11 codes = 33 bits → 2 words; code 10 = 0b111 straddles: bits 30, 31 of word 0 and bit 0 of word 1
    assert pack(torch.tensor([0] * 10 + [7]), 3).tolist() == [s32(0xC0000000), 1]
    # code 10 = 0b100: only its top bit crosses into word 1
    assert pack(torch.tensor([0] * 10 + [4]), 3).tolist() == [0, 1]
    # 32 codes → exactly 3 words
    assert pack(torch.zeros(32, dtype=torch.uint8), 3).shape == (3,)
    assert pack(torch.full((32,), 7), 3).tolist() == [-1, -1, -1]
    # 5-bit: 7 codes = 35 bits → 2 words; all ones → 0xFFFFFFFF, 0b111
    assert pack(torch.full((7,), 31), 5).tolist() == [-1, 7]
    # 1-bit: alternating 1,0 → 0x55555555; the 33rd bit lands in word 1
    assert pack(torch.tensor([1, 0] * 16 + [1]), 1).tolist() == [0x55555555, 1]
    # 6-bit: 0b101010 at position 5 → stream bits 30..35: word0 bit 31 (bit 1 of code), word1 bits 1, 3
    assert pack(torch.tensor([0] * 5 + [42]), 6).tolist() == [s32(0x80000000), 0b1010]


def gptq_pack_3bit(intweight: np.ndarray) -> np.ndarray:
    """GPTQ's reference 3-bit packer (IST-DASLab/gptq quant.py `Quant3Linear.pack`), along axis 0."""
    intweight = intweight.astype(np.uint32)
    qweight = np.zeros((intweight.shape[0] // 32 * 3, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        for j in range(i, i + 10):
            qweight[row] |= intweight[j] << (3 * (j - i))
        i += 10
        qweight[row] |= intweight[i] << 30
        row += 1
        qweight[row] |= (intweight[i] >> 2) & 1
        i += 1
        for j in range(i, i + 10):
            qweight[row] |= intweight[j] << (3 * (j - i) + 1)
        i += 10
        qweight[row] |= intweight[i] << 31
        row += 1
        qweight[row] |= (intweight[i] >> 1) & 0x3
        i += 1
        for j in range(i, i + 10):
            qweight[row] |= intweight[j] << (3 * (j - i) + 2)
        i += 10
        row += 1
    return qweight.astype(np.int32)


def gptq_pack_pow2(intweight: np.ndarray, bits: int) -> np.ndarray:
    """GPTQ's reference packer for bits ∈ {2, 4, 8}, along axis 0."""
    intweight = intweight.astype(np.uint32)
    per = 32 // bits
    qweight = np.zeros((intweight.shape[0] // per, intweight.shape[1]), dtype=np.uint32)
    for row in range(qweight.shape[0]):
        for j in range(per):
            qweight[row] |= intweight[row * per + j] << (bits * j)
    return qweight.astype(np.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_matches_gptq_reference_layout(bits):
    """GPTQ packs [in, out] along `in`; we pack [out, in] along `in`: the words are the transpose."""
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (6, 128), generator=g).to(torch.uint8)  # [out, in]
    ours = pack(codes, bits)
    ref = gptq_pack_3bit(codes.T.numpy()) if bits == 3 else gptq_pack_pow2(codes.T.numpy(), bits)
    assert np.array_equal(ours.T.numpy(), ref)


def test_empty_and_dtypes():
    assert pack(torch.zeros(4, 0, dtype=torch.uint8), 4).shape == (4, 0)
    assert unpack(torch.zeros(4, 0, dtype=torch.int32), 4, 0).shape == (4, 0)
    c = torch.tensor([[3, 1, 2]], dtype=torch.int32)
    assert torch.equal(pack(c, 2), pack(c.to(torch.uint8), 2))


def test_out_of_range_codes_raise():
    with pytest.raises(LowbitError):
        pack(torch.tensor([0, 16, 1]), 4)
    with pytest.raises(LowbitError):
        pack(torch.tensor([0, 8]), 3)
    with pytest.raises(LowbitError):
        pack(torch.tensor([-1, 0]), 4)
    with pytest.raises(LowbitError):
        pack(torch.tensor([256]), 8)
    with pytest.raises(LowbitError):
        pack(torch.tensor([2]), 1)
    for bits in (0, 9):
        with pytest.raises(LowbitError):
            pack(torch.tensor([0]), bits)
        with pytest.raises(LowbitError):
            unpack(torch.tensor([0], dtype=torch.int32), bits, 1)


def test_wrong_word_count_on_unpack_raises():
    words = pack(torch.zeros(2, 40, dtype=torch.uint8), 4)  # 5 words per row
    assert words.shape == (2, 5)
    unpack(words, 4, 33)  # 33 codes also need 5 words: fine
    with pytest.raises(LowbitError):
        unpack(words, 4, 41)  # needs 6
    with pytest.raises(LowbitError):
        unpack(words, 4, 32)  # needs 4
    assert unpack(words[:, :4], 3, 40).shape == (2, 40)  # 3-bit × 40 = 120 bits → 4 words
    with pytest.raises(LowbitError):
        unpack(words[:, :3], 3, 40)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_row_chunks_and_strided_input(bits, monkeypatch):
    """Large tensors are packed a few rows at a time; a chunk size that splits the rows unevenly and a
    transposed (non-contiguous) input give the words of the one-shot reference packer."""
    import lowbit.formats.packing as packing

    monkeypatch.setattr(packing, "_CHUNK_CODES", 3 * 45)  # 3 rows of 45 codes per chunk, 7 rows
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (45, 7), generator=g).to(torch.uint8).T  # [7, 45], strided
    words = pack(codes, bits)
    for r in range(7):
        assert words[r].tolist() == ref_pack(codes[r].tolist(), bits)
    assert torch.equal(unpack(words, bits, 45), codes)
    assert torch.equal(unpack(words.T.contiguous().T, bits, 45), codes)  # strided words too
