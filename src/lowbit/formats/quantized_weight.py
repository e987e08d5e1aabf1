"""`QuantizedWeight`: the one object every method produces for one weight matrix.

Pure data plus its exact reference semantics. `dequantize()` defines what the compressed weight *is*;
every kernel and every exporter must reproduce it. `storage()` counts every stored bit — codes as packed
on disk, scales, zeros, exponents, g_idx, outlier values *and* positions, low-rank factors — and
`bits_per_weight()` divides that by the original element count (DESIGN.md: bits are counted honestly).

Weights use the PyTorch layout [out_features, in_features]; groups run along the input dimension.
Codes are kept unpacked (uint8) in memory and packed only for storage (`formats.packing`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lowbit.errors import LowbitError
from lowbit.formats import packing
from lowbit.formats.quant_primitives import (
    affine_dequantize,
    expand_group_param,
    mxint_dequantize,
    n_groups,
)

Tensors = dict[str, torch.Tensor]


def _bits(t: torch.Tensor) -> int:
    return t.numel() * t.element_size() * 8


@dataclass
class UniformGrid:
    """Affine integer grid: ŵ[r, c] = (q[r, c] − z[r, g(c)]) · s[r, g(c)].

    Scales are stored in fp16; zeros of asymmetric grids are stored packed with `bits` bits in GPTQ's
    qzeros layout (per group, one packed row of all output channels' zeros: [G, ⌈R·b/32⌉] words); a
    symmetric grid's zero is the constant 2^(b−1) and costs nothing. `g_idx` (int32, one per input
    column) is present only for act-order with dynamic groups.
    """

    bits: int
    group_size: int
    symmetric: bool
    scale: torch.Tensor
    zero: torch.Tensor
    g_idx: torch.Tensor | None = None
    kind: str = field(default="uniform", init=False)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        s = expand_group_param(self.scale, codes.shape, self.group_size, self.g_idx)
        z = expand_group_param(self.zero, codes.shape, self.group_size, self.g_idx)
        return affine_dequantize(codes, s, z)

    def storage(self) -> dict[str, int]:
        out = {"scales": _bits(self.scale)}
        if not self.symmetric:
            out["zeros"] = self.zero.shape[1] * packing.packed_words(self.zero.shape[0], self.bits) * 32
        if self.g_idx is not None:
            out["g_idx"] = _bits(self.g_idx)
        return out

    def meta(self) -> dict:
        return {"kind": self.kind, "bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}

    def tensors(self) -> Tensors:
        t = {"scale": self.scale}
        if not self.symmetric:
            t["qzeros"] = packing.pack(self.zero.T, self.bits)
        if self.g_idx is not None:
            t["g_idx"] = self.g_idx
        return t

    @classmethod
    def from_state(cls, meta: dict, t: Tensors, shape: tuple[int, int]) -> "UniformGrid":
        bits, gs, sym = int(meta["bits"]), int(meta["group_size"]), bool(meta["symmetric"])
        scale = t["scale"]
        if sym:
            zero = torch.full(scale.shape, 2 ** (bits - 1), dtype=torch.int32)
        else:
            zero = packing.unpack(t["qzeros"], bits, scale.shape[0]).T.to(torch.int32).contiguous()
        return cls(bits, gs, sym, scale, zero, t.get("g_idx"))


@dataclass
class MXIntGrid:
    """MXINT block floating point: ŵ = m · 2^(e − (b−1)), one exponent per block of input columns.

    Codes hold the sign-magnitude integer m ∈ [−(2^(b−1)−1), 2^(b−1)−1] offset by 2^(b−1), so a code is
    an unsigned b-bit number; exponents cost `exp_bits` each.
    """

    bits: int
    block_size: int
    exponent: torch.Tensor
    exp_bits: int = 8
    kind: str = field(default="mxint", init=False)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        m = codes.to(torch.int16) - 2 ** (self.bits - 1)
        return mxint_dequantize(m, self.exponent, self.bits, self.block_size)

    def storage(self) -> dict[str, int]:
        return {"exponents": self.exponent.numel() * self.exp_bits}

    def meta(self) -> dict:
        return {"kind": self.kind, "bits": self.bits, "block_size": self.block_size, "exp_bits": self.exp_bits}

    def tensors(self) -> Tensors:
        return {"exponent": self.exponent}

    @classmethod
    def from_state(cls, meta: dict, t: Tensors, shape: tuple[int, int]) -> "MXIntGrid":
        return cls(int(meta["bits"]), int(meta["block_size"]), t["exponent"], int(meta["exp_bits"]))


GRIDS = {"uniform": UniformGrid, "mxint": MXIntGrid}
Grid = UniformGrid | MXIntGrid


@dataclass
class Outliers:
    """Sparse full-precision entries that replace the grid value: flat index r·in + c (int32), fp16 value."""

    index: torch.Tensor
    values: torch.Tensor

    def storage(self) -> dict[str, int]:
        return {"outlier_values": _bits(self.values), "outlier_index": _bits(self.index)}


@dataclass
class LowRank:
    """W ≈ Ŵ + (A·B)ᵀ with A [in, k], B [k, out] (LQER's orientation: y = x·Ŵᵀ + (x·A)·B)."""

    A: torch.Tensor
    B: torch.Tensor

    def delta(self) -> torch.Tensor:
        return (self.A.float() @ self.B.float()).T

    def storage(self) -> dict[str, int]:
        return {"lowrank": _bits(self.A) + _bits(self.B)}


@dataclass
class QuantizedWeight:
    shape: tuple[int, int]
    dtype: torch.dtype
    grid: Grid
    codes: torch.Tensor
    outliers: Outliers | None = None
    lowrank: LowRank | None = None

    def __post_init__(self):
        self.shape = tuple(int(s) for s in self.shape)
        if tuple(self.codes.shape) != self.shape:
            raise LowbitError(f"codes shape {tuple(self.codes.shape)} does not match weight shape {self.shape}")

    @property
    def bits(self) -> int:
        return self.grid.bits

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The compressed weight in float32 (or `dtype`), layout [out, in]. Defines correctness."""
        w = self.grid.dequantize(self.codes)
        if self.outliers is not None:
            w.view(-1)[self.outliers.index.long()] = self.outliers.values.float()
        if self.lowrank is not None:
            w += self.lowrank.delta()
        return w if dtype is None else w.to(dtype)

    def storage(self) -> dict[str, int]:
        """Stored bits by kind; `codes` is the packed size on disk."""
        rows, cols = self.shape
        out = {"codes": rows * packing.packed_words(cols, self.grid.bits) * 32}
        out.update(self.grid.storage())
        if self.outliers is not None:
            out.update(self.outliers.storage())
        if self.lowrank is not None:
            out.update(self.lowrank.storage())
        return out

    def bits_per_weight(self) -> float:
        return sum(self.storage().values()) / (self.shape[0] * self.shape[1])

    # ---- serialisation: flat tensors + JSON-able metadata (the native format lives in lowbit.io)

    def to_state(self) -> tuple[Tensors, dict]:
        t = {"qweight": packing.pack(self.codes, self.grid.bits)}
        t.update({f"grid.{k}": v for k, v in self.grid.tensors().items()})
        if self.outliers is not None:
            t["outliers.index"], t["outliers.values"] = self.outliers.index, self.outliers.values
        if self.lowrank is not None:
            t["lowrank.A"], t["lowrank.B"] = self.lowrank.A, self.lowrank.B
        meta = {"shape": list(self.shape), "dtype": str(self.dtype).removeprefix("torch."), "grid": self.grid.meta()}
        return {k: v.contiguous() for k, v in t.items()}, meta

    @classmethod
    def from_state(cls, t: Tensors, meta: dict) -> "QuantizedWeight":
        try:
            shape = tuple(int(s) for s in meta["shape"])
            gmeta = meta["grid"]
            grid_cls = GRIDS[gmeta["kind"]]
            grid = grid_cls.from_state(gmeta, {k[5:]: v for k, v in t.items() if k.startswith("grid.")}, shape)
            codes = packing.unpack(t["qweight"], grid.bits, shape[1])
            outliers = Outliers(t["outliers.index"], t["outliers.values"]) if "outliers.index" in t else None
            lowrank = LowRank(t["lowrank.A"], t["lowrank.B"]) if "lowrank.A" in t else None
            dtype = getattr(torch, meta["dtype"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise LowbitError(f"corrupt quantized weight record: {e!r}") from e
        if codes.shape[0] != shape[0]:
            raise LowbitError(f"corrupt quantized weight record: {codes.shape[0]} rows, {shape[0]} expected")
        qw = cls(shape, dtype, grid, codes, outliers, lowrank)
        qw.check()
        return qw

    def check(self) -> None:
        """Raise LowbitError unless every stored tensor fits `shape` (run on every load)."""
        rows, cols = self.shape
        g = self.grid

        def need(ok, what: str) -> None:
            if not ok:
                raise LowbitError(f"corrupt quantized weight record: {what}")

        if isinstance(g, UniformGrid):
            try:
                G = n_groups(cols, g.group_size)
            except LowbitError as e:
                raise LowbitError(f"corrupt quantized weight record: {e}") from e
            R = 1 if g.group_size == 0 else rows
            need(tuple(g.scale.shape) == (R, G), f"scale shape {tuple(g.scale.shape)}, {(R, G)} expected")
            need(tuple(g.zero.shape) == (R, G), f"zero shape {tuple(g.zero.shape)}, {(R, G)} expected")
            if g.g_idx is not None:
                need(g.group_size > 0 and tuple(g.g_idx.shape) == (cols,), f"g_idx shape {tuple(g.g_idx.shape)}")
                need(cols == 0 or (0 <= int(g.g_idx.min()) and int(g.g_idx.max()) < G), "g_idx out of range")
        else:
            need(g.block_size > 0 and cols % g.block_size == 0, f"block size {g.block_size} does not divide {cols}")
            blocks = (rows, cols // g.block_size)
            need(tuple(g.exponent.shape) == blocks, f"exponent shape {tuple(g.exponent.shape)}, {blocks} expected")
        if self.outliers is not None:
            i, v = self.outliers.index, self.outliers.values
            need(i.ndim == 1 and i.shape == v.shape, f"outlier index {tuple(i.shape)} / values {tuple(v.shape)}")
            need(i.numel() == 0 or (0 <= int(i.min()) and int(i.max()) < rows * cols), "outlier index out of range")
        if self.lowrank is not None:
            A, B = self.lowrank.A, self.lowrank.B
            need(A.ndim == 2 and B.ndim == 2 and A.shape[0] == cols and B.shape[1] == rows
                 and A.shape[1] == B.shape[0], f"low-rank A {tuple(A.shape)}, B {tuple(B.shape)} for {self.shape}")
