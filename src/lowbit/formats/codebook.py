"""Codebook (look-up table) grid: every vector of a weight has its own small table of 2^b values.

    ŵ[r, c] = LUT[v, codes[r, c]],   v = c for axis "column" (CLAQ: one codebook per input column),
                                     v = r for axis "row"    (SqueezeLLM: one per output row)

Vector v has its own width b_v (CLAQ's adaptive precision mixes two widths); its codes are < 2^b_v and
only its first 2^b_v table entries exist. In memory the table is one fp16 tensor `codebook`
[n_vec, 2^max_b] (unused entries are zero) — the LUT a kernel reads.

Stored (and counted by `storage()`), per width b present:
* `qweight.b{b}`: the codes of the vectors of width b, each vector's codes packed with b bits
  (`formats.packing`): for axis "column" codes[:, cols of width b]ᵀ (one packed run per column, so no
  row pays word padding per width: out·b is a multiple of 32 for out a multiple of 32), for axis "row"
  codes[rows of width b, :] (the usual row-major layout);
* the table entries of those vectors, 2^b each: fp16 (`entry_bits` 16, `codebook.b{b}`), or uint8 on a
  per-vector affine grid (`entry_bits` 8: `entries.b{b}` plus one fp16 scale and one fp16 minimum per
  vector, LUT = fp16(min + q·scale) computed in float32) — 8-bit entries halve the table, which matters
  when vectors are short (8 fp16 entries on a 256-long column cost 0.5 bits per weight); `entry_bits`
  2..7 use the same affine grid with 2^e − 1 steps, the entries of each width packed with e bits into one
  bitstream (`entries.b{b}`, int32 words);
* optionally (axis "column" only, `row_scale`) one fp16 scale per output row, ŵ[r, c] = s_r · LUT[c, q]:
  per-column codebooks of the row-normalized weight, so the codebook need not follow per-row magnitudes
  (an extension beyond CLAQ: 16 bits per row);
* with more than one width, which width each vector has: an index into the `widths` list of the
  metadata, packed with ⌈log2 #widths⌉ bits per vector (`width_index`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lowbit.errors import LowbitError
from lowbit.formats import packing

Tensors = dict[str, torch.Tensor]


def encode_codebook(centroids: torch.Tensor, entry_bits: int):
    """Centroids [n, K] (ascending) → (LUT fp16 [n, K], entries uint8 | None, scale fp16 | None, min fp16 | None).

    The LUT is the exactly stored table: codes must be chosen against it, not against the raw centroids."""
    c = centroids.float()
    if entry_bits == 16:
        return c.half(), None, None, None
    if not 2 <= entry_bits <= 8:
        raise LowbitError(f"codebook entries of {entry_bits} bits are not supported (16, or 2 to 8)")
    top = 2**entry_bits - 1
    lo = c.min(1).values.half()
    span = c.max(1).values - lo.float()
    scale = (span / top).half()
    scale = torch.where(scale.float() > 0, scale, torch.ones_like(scale))  # constant vector: any scale
    q = torch.round((c - lo.float()[:, None]) / scale.float()[:, None]).clamp(0, top).to(torch.uint8)
    return _decode(q, scale, lo), q, scale, lo


def _decode(q: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    return (lo.float()[:, None] + q.float() * scale.float()[:, None]).half()


@dataclass
class CodebookGrid:
    axis: str  # "column" (one table per input column) or "row" (one per output row)
    vec_bits: torch.Tensor  # uint8 [n_vec]: each vector's code width
    codebook: torch.Tensor  # fp16 [n_vec, 2^max(vec_bits)]: the LUT
    entry_bits: int = 16
    entries: torch.Tensor | None = None  # uint8 [n_vec, 2^max_b] when entry_bits == 8
    entry_scale: torch.Tensor | None = None  # fp16 [n_vec]
    entry_min: torch.Tensor | None = None  # fp16 [n_vec]
    row_scale: torch.Tensor | None = None  # fp16 [rows], axis "column" only: ŵ[r, c] = s_r · LUT[c, q]
    kind: str = field(default="codebook", init=False)

    @property
    def bits(self) -> int:
        """The widest code (what a fixed-width consumer must handle)."""
        return int(self.vec_bits.max()) if self.vec_bits.numel() else 0

    @property
    def widths(self) -> list[int]:
        return sorted({int(b) for b in self.vec_bits.unique()})

    def mean_code_bits(self) -> float:
        return float(self.vec_bits.double().mean())

    def _select(self, b: int) -> torch.Tensor:
        return torch.nonzero(self.vec_bits == b)[:, 0]

    def _codes_of(self, codes: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
        return codes[:, sel] if self.axis == "column" else codes[sel, :]

    # ---- semantics

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        lut = self.codebook.float()
        if self.axis == "column":
            w = torch.gather(lut.T, 0, codes.long())  # ŵ[r, c] = lut[c, codes[r, c]]
            return w if self.row_scale is None else w * self.row_scale.float()[:, None]
        return torch.gather(lut, 1, codes.long())

    # ---- storage

    def codes_storage(self, shape: tuple[int, int]) -> int:
        rows, cols = shape
        total = 0
        for b in self.widths:
            n = int((self.vec_bits == b).sum())
            total += n * packing.packed_words(rows if self.axis == "column" else cols, b) * 32
        return total

    def storage(self) -> dict[str, int]:
        if self.entry_bits in (8, 16):
            out = {"codebook": int(sum(2 ** int(b) for b in self.vec_bits.tolist())) * self.entry_bits}
        else:  # each width's entries packed into one bitstream
            out = {"codebook": sum(packing.packed_words(int((self.vec_bits == b).sum()) * 2**b, self.entry_bits)
                                   for b in self.widths) * 32}
        if self.entry_bits != 16:
            out["codebook_scales"] = self.vec_bits.numel() * 2 * 16
        if self.row_scale is not None:
            out["row_scales"] = self.row_scale.numel() * 16
        if len(self.widths) > 1:
            out["widths"] = packing.packed_words(self.vec_bits.numel(), self._index_bits()) * 32
        return out

    def _index_bits(self) -> int:
        return max(1, math.ceil(math.log2(len(self.widths))))

    # ---- serialisation

    def meta(self) -> dict:
        m = {"kind": self.kind, "axis": self.axis, "widths": self.widths, "entry_bits": self.entry_bits}
        if self.row_scale is not None:
            m["row_scale"] = True
        return m

    def tensors(self) -> Tensors:
        t: Tensors = {}
        for b in self.widths:
            sel = self._select(b)
            if self.entry_bits == 16:
                t[f"codebook.b{b}"] = self.codebook[sel, : 2**b]
            elif self.entry_bits == 8:
                t[f"entries.b{b}"] = self.entries[sel, : 2**b]
            else:
                t[f"entries.b{b}"] = packing.pack(self.entries[sel, : 2**b].reshape(1, -1), self.entry_bits)
        if self.entry_bits != 16:
            t["entry_scale"], t["entry_min"] = self.entry_scale, self.entry_min
        if self.row_scale is not None:
            t["row_scale"] = self.row_scale
        if len(self.widths) > 1:
            idx = torch.searchsorted(torch.tensor(self.widths), self.vec_bits.long())
            t["width_index"] = packing.pack(idx, self._index_bits())
        return t

    def pack_codes(self, codes: torch.Tensor) -> Tensors:
        out = {}
        for b in self.widths:
            c = self._codes_of(codes, self._select(b))
            out[f"qweight.b{b}"] = packing.pack(c.T if self.axis == "column" else c, b)
        return out

    def unpack_codes(self, t: Tensors, shape: tuple[int, int]) -> torch.Tensor:
        rows, cols = shape
        codes = torch.zeros(shape, dtype=torch.uint8)
        for b in self.widths:
            sel = self._select(b)
            if self.axis == "column":
                codes[:, sel] = packing.unpack(t[f"qweight.b{b}"], b, rows).T
            else:
                codes[sel, :] = packing.unpack(t[f"qweight.b{b}"], b, cols)
        return codes

    @classmethod
    def from_state(cls, meta: dict, t: Tensors, shape: tuple[int, int]) -> "CodebookGrid":
        axis, widths, eb = str(meta["axis"]), [int(b) for b in meta["widths"]], int(meta["entry_bits"])
        if axis not in ("column", "row") or not (eb == 16 or 2 <= eb <= 8) or not widths or not all(1 <= b <= 8 for b in widths):
            raise LowbitError(f"codebook grid metadata {meta} is invalid")
        n_vec = shape[1] if axis == "column" else shape[0]
        if len(widths) > 1:
            ib = max(1, math.ceil(math.log2(len(widths))))
            idx = packing.unpack(t["width_index"], ib, n_vec).long()
            if int(idx.max()) >= len(widths):
                raise LowbitError("codebook width index out of range")
            vec_bits = torch.tensor(widths, dtype=torch.uint8)[idx]
        else:
            vec_bits = torch.full((n_vec,), widths[0], dtype=torch.uint8)
        K = 2 ** max(widths)
        lut = torch.zeros(n_vec, K, dtype=torch.float16)
        entries = scale = lo = None
        if eb != 16:
            entries = torch.zeros(n_vec, K, dtype=torch.uint8)
            scale, lo = t["entry_scale"], t["entry_min"]
            if scale.shape != (n_vec,) or lo.shape != (n_vec,):
                raise LowbitError(f"codebook scale/min shape {tuple(scale.shape)}, ({n_vec},) expected")
        for b in widths:
            sel = torch.nonzero(vec_bits == b)[:, 0]
            src = t[f"codebook.b{b}"] if eb == 16 else t[f"entries.b{b}"]
            if eb not in (8, 16):
                if tuple(src.shape) != (1, packing.packed_words(len(sel) * 2**b, eb)):
                    raise LowbitError(f"packed codebook entries of width {b} have shape {tuple(src.shape)}")
                src = packing.unpack(src, eb, len(sel) * 2**b).reshape(len(sel), 2**b)
            if tuple(src.shape) != (len(sel), 2**b):
                raise LowbitError(f"codebook of width {b} has shape {tuple(src.shape)}, {(len(sel), 2**b)} expected")
            if eb == 16:
                lut[sel, : 2**b] = src
            else:
                entries[sel, : 2**b] = src
        if eb != 16:
            lut = torch.where(_mask(vec_bits, K), _decode(entries, scale, lo), lut)
        row_scale = None
        if meta.get("row_scale"):
            row_scale = t.get("row_scale")
            if axis != "column" or row_scale is None or tuple(row_scale.shape) != (shape[0],):
                raise LowbitError(f"codebook row scales missing or of the wrong shape ({shape[0]} rows expected)")
            row_scale = row_scale.half()
        return cls(axis, vec_bits, lut, eb, entries, scale, lo, row_scale)

    def check(self, shape: tuple[int, int], codes: torch.Tensor | None = None) -> None:
        n_vec = shape[1] if self.axis == "column" else shape[0]
        if self.axis not in ("column", "row"):
            raise LowbitError(f"corrupt quantized weight record: codebook axis {self.axis!r}")
        if tuple(self.vec_bits.shape) != (n_vec,):
            raise LowbitError(f"corrupt quantized weight record: {self.vec_bits.numel()} code widths, {n_vec} expected")
        if self.codebook.ndim != 2 or self.codebook.shape[0] != n_vec or self.codebook.shape[1] < 2 ** self.bits:
            raise LowbitError(f"corrupt quantized weight record: codebook shape {tuple(self.codebook.shape)}")
        if self.row_scale is not None and (self.axis != "column" or tuple(self.row_scale.shape) != (shape[0],)
                                           or not torch.isfinite(self.row_scale).all()):
            raise LowbitError("corrupt quantized weight record: codebook row scales")
        if codes is not None and codes.numel():
            limit = (2 ** self.vec_bits.long())
            limit = limit[None, :] if self.axis == "column" else limit[:, None]
            if (codes.long() >= limit).any():
                raise LowbitError("corrupt quantized weight record: a code exceeds its vector's width")


def _mask(vec_bits: torch.Tensor, K: int) -> torch.Tensor:
    return torch.arange(K)[None, :] < (2 ** vec_bits.long())[:, None]


def make_codebook_grid(axis: str, vec_bits: torch.Tensor, luts: torch.Tensor, entry_bits: int,
                       entries=None, scale=None, lo=None, row_scale=None) -> CodebookGrid:
    """Assemble a grid from per-vector LUTs [n_vec, 2^max_b] (unused entries are zeroed)."""
    K = luts.shape[1]
    m = _mask(vec_bits, K)
    lut = torch.where(m, luts.half(), torch.zeros((), dtype=torch.float16))
    if entries is not None:
        entries = torch.where(m, entries, torch.zeros((), dtype=torch.uint8))
    return CodebookGrid(axis, vec_bits.to(torch.uint8), lut, entry_bits, entries, scale, lo,
                        None if row_scale is None else row_scale.half())
