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
from lowbit.formats.additive import AdditiveGrid
from lowbit.formats.binary import SignGrid
from lowbit.formats.codebook import CodebookGrid
from lowbit.formats.quant_primitives import (
    affine_dequantize,
    expand_group_param,
    mxint_dequantize,
    n_groups,
)
from lowbit.formats.sparse_positions import decode_positions, encode_positions

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

    Float zeros (HQQ's unrounded zero points): an fp16 `zero` tensor [R, G] marks them; they are stored
    as is (16 bits each, tensor `zero`, meta `"zero": "fp16"`) and subtracted in float32.
    """

    bits: int
    group_size: int
    symmetric: bool
    scale: torch.Tensor
    zero: torch.Tensor
    g_idx: torch.Tensor | None = None
    kind: str = field(default="uniform", init=False)

    @property
    def float_zero(self) -> bool:
        return self.zero.is_floating_point()

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        s = expand_group_param(self.scale, codes.shape, self.group_size, self.g_idx)
        z = expand_group_param(self.zero.float() if self.float_zero else self.zero, codes.shape, self.group_size,
                               self.g_idx)  # int32 − fp16 would subtract in fp16
        return affine_dequantize(codes, s, z)

    def storage(self) -> dict[str, int]:
        out = {"scales": _bits(self.scale)}
        if self.float_zero:
            out["zeros"] = _bits(self.zero)
        elif not self.symmetric:
            out["zeros"] = self.zero.shape[1] * packing.packed_words(self.zero.shape[0], self.bits) * 32
        if self.g_idx is not None:
            out["g_idx"] = _bits(self.g_idx)
        return out

    def meta(self) -> dict:
        m = {"kind": self.kind, "bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}
        return {**m, "zero": "fp16"} if self.float_zero else m

    def tensors(self) -> Tensors:
        t = {"scale": self.scale}
        if self.float_zero:
            t["zero"] = self.zero
        elif not self.symmetric:
            t["qzeros"] = packing.pack(self.zero.T, self.bits)
        if self.g_idx is not None:
            t["g_idx"] = self.g_idx
        return t

    @classmethod
    def from_state(cls, meta: dict, t: Tensors, shape: tuple[int, int]) -> "UniformGrid":
        bits, gs, sym = int(meta["bits"]), int(meta["group_size"]), bool(meta["symmetric"])
        scale = t["scale"]
        if meta.get("zero", "int") not in ("int", "fp16"):
            raise ValueError(f"unknown zero storage {meta['zero']!r}")
        if meta.get("zero") == "fp16":
            zero = t["zero"]
        elif sym:
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


GRIDS = {"uniform": UniformGrid, "mxint": MXIntGrid, "codebook": CodebookGrid, "additive": AdditiveGrid,
         "sign": SignGrid}
Grid = UniformGrid | MXIntGrid | CodebookGrid | AdditiveGrid | SignGrid


@dataclass
class Outliers:
    """Sparse full-precision entries that replace the grid value: flat index r·in + c (int32), fp16 value.

    Kept sorted by index (sorted on construction). Positions are stored compactly — per-row counts and
    packed column indices (`formats.sparse_positions`) — and counted as stored; records written with a
    flat int32 `outliers.index` (the earlier layout) still load.
    """

    index: torch.Tensor
    values: torch.Tensor

    def __post_init__(self):
        if self.index.ndim == 1 and self.index.shape == self.values.shape and self.index.numel() > 1:
            order = torch.argsort(self.index, stable=True)
            self.index, self.values = self.index[order], self.values[order]

    def storage(self, shape: tuple[int, int]) -> dict[str, int]:
        t, _ = encode_positions(self.index, shape)
        return {"outlier_values": _bits(self.values), "outlier_index": sum(_bits(v) for v in t.values())}

    def tensors(self, shape: tuple[int, int]) -> tuple[Tensors, dict]:
        t, meta = encode_positions(self.index, shape)
        t = {f"outliers.{k}": v for k, v in t.items()}
        t["outliers.values"] = self.values
        return t, meta

    @classmethod
    def from_state(cls, meta: dict | None, t: Tensors, shape: tuple[int, int]) -> "Outliers":
        if "outliers.index" in t:  # earlier layout: flat int32 index
            return cls(t["outliers.index"], t["outliers.values"])
        pos = {k[9:]: v for k, v in t.items() if k.startswith("outliers.") and k != "outliers.values"}
        return cls(decode_positions(pos, meta or {}, shape), t["outliers.values"])


def lowrank_factor_dequantize(kind: str, q: torch.Tensor, s: torch.Tensor | None, block_size: int) -> torch.Tensor:
    """One stored low-rank factor → float32 (see `LowRank`)."""
    if kind == "float":
        return q.float()
    if kind == "int8":
        return q.float() * s.float()[:, None]
    return mxint_dequantize(q.float(), s, 8, block_size)


@dataclass
class LowRank:
    """W ≈ Ŵ + (A·B)ᵀ with A [in, k], B [k, out] (LQER's orientation: y = x·Ŵᵀ + (x·A)·B).

    `kind` is how the factors are stored (each factor F ∈ {A, B}, scales per row of F):
    * "float": A, B are the stored fp16 / bf16 / fp32 tensors.
    * "int8": int8 codes q ∈ [−127, 127], F = q · s[row] with fp16 `a_scale` [in], `b_scale` [k].
    * "mxint8": int8 sign-magnitude codes m, F = m · 2^(e − 7) with one exponent (`exp_bits` bits) per
      `block_size` consecutive elements of a row (the last block of a row may be short): `a_scale`
      [in, ⌈k/bs⌉], `b_scale` [k, ⌈out/bs⌉] int16. Blocks run along the rank for A and along the output
      for B, the [1, 16] orientation of the authors' sweep scripts.
    """

    A: torch.Tensor
    B: torch.Tensor
    kind: str = "float"
    a_scale: torch.Tensor | None = None
    b_scale: torch.Tensor | None = None
    block_size: int = 16
    exp_bits: int = 8

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The deployed A [in, k] and B [k, out] in float32."""
        return (lowrank_factor_dequantize(self.kind, self.A, self.a_scale, self.block_size),
                lowrank_factor_dequantize(self.kind, self.B, self.b_scale, self.block_size))

    def delta(self) -> torch.Tensor:
        A, B = self.factors()
        return (A @ B).T

    def storage(self) -> dict[str, int]:
        out = {"lowrank": _bits(self.A) + _bits(self.B)}
        if self.kind == "int8":
            out["lowrank_scales"] = _bits(self.a_scale) + _bits(self.b_scale)
        elif self.kind == "mxint8":
            out["lowrank_scales"] = (self.a_scale.numel() + self.b_scale.numel()) * self.exp_bits
        return out

    def meta(self) -> dict | None:
        return None if self.kind == "float" else {"kind": self.kind, "block_size": self.block_size,
                                                  "exp_bits": self.exp_bits}

    def tensors(self) -> Tensors:
        t = {"lowrank.A": self.A, "lowrank.B": self.B}
        if self.kind != "float":
            t["lowrank.a_scale"], t["lowrank.b_scale"] = self.a_scale, self.b_scale
        return t

    @classmethod
    def from_state(cls, meta: dict | None, t: Tensors) -> "LowRank":
        if meta is None:
            return cls(t["lowrank.A"], t["lowrank.B"])
        if meta["kind"] not in ("int8", "mxint8"):
            raise ValueError(f"unknown low-rank kind {meta['kind']!r}")
        return cls(t["lowrank.A"], t["lowrank.B"], meta["kind"], t["lowrank.a_scale"], t["lowrank.b_scale"],
                   int(meta["block_size"]), int(meta["exp_bits"]))

    def check(self) -> str | None:
        """What is wrong with the factors' own tensors, or None."""
        A, B = self.A, self.B
        if self.kind == "float":
            return None
        if A.dtype != torch.int8 or B.dtype != torch.int8:
            return f"low-rank codes must be int8, got {A.dtype} / {B.dtype}"
        if self.kind == "int8":
            want = ((A.shape[0],), (B.shape[0],))
        else:
            if self.block_size < 1:
                return f"low-rank block size {self.block_size}"
            nb = lambda n: -(-n // self.block_size)  # noqa: E731
            want = ((A.shape[0], nb(A.shape[1])), (B.shape[0], nb(B.shape[1])))
        got = (tuple(self.a_scale.shape), tuple(self.b_scale.shape))
        return None if got == want else f"low-rank scales {got[0]} / {got[1]}, {want[0]} / {want[1]} expected"


@dataclass
class QuantizedWeight:
    """Ŵ = (grid(codes), outliers substituted)·diag(in_scale)⁻¹ + (A·B)ᵀ.

    `in_scale` (fp16 [in], AWQ's s; None = 1): the grid and the outliers hold the scaled weight W·diag(s),
    so Q(W·diag s) is divided back column by column; the low-rank term corrects the final Ŵ and is not
    scaled. Runtimes compute (x/s)·Q(W')ᵀ (+ (x·A)·B).
    """

    shape: tuple[int, int]
    dtype: torch.dtype
    grid: Grid
    codes: torch.Tensor
    outliers: Outliers | None = None
    lowrank: LowRank | None = None
    in_scale: torch.Tensor | None = None

    def __post_init__(self):
        self.shape = tuple(int(s) for s in self.shape)
        code_shape = getattr(self.grid, "code_shape", None)  # vector codes (additive): their own shape
        expect = tuple(code_shape(self.shape)) if code_shape else self.shape
        if tuple(self.codes.shape) != expect:
            raise LowbitError(f"codes shape {tuple(self.codes.shape)} does not match the weight's {expect}")

    @property
    def bits(self) -> int:
        return self.grid.bits

    def dequantize(self, dtype: torch.dtype | None = None, lowrank: bool = True) -> torch.Tensor:
        """The compressed weight in float32 (or `dtype`), layout [out, in]. Defines correctness.
        `lowrank=False`: the base grid (and outliers) only, for kernels that run the factors apart."""
        w = self.grid.dequantize(self.codes)
        if self.outliers is not None:
            w.view(-1)[self.outliers.index.long()] = self.outliers.values.float()
        if self.in_scale is not None:
            w /= self.in_scale.float()
        if lowrank and self.lowrank is not None:
            w += self.lowrank.delta()
        return w if dtype is None else w.to(dtype)

    def storage(self) -> dict[str, int]:
        """Stored bits by kind; `codes` is the packed size on disk."""
        rows, cols = self.shape
        # A grid with per-vector code widths (codebook) packs and counts its own codes.
        codes_storage = getattr(self.grid, "codes_storage", None)
        out = {"codes": codes_storage(self.shape) if codes_storage else rows * packing.packed_words(cols, self.grid.bits) * 32}
        out.update(self.grid.storage())
        if self.outliers is not None:
            out.update(self.outliers.storage(self.shape))
        if self.lowrank is not None:
            out.update(self.lowrank.storage())
        if self.in_scale is not None:
            out["in_scale"] = _bits(self.in_scale)
        return out

    def bits_per_weight(self) -> float:
        return sum(self.storage().values()) / (self.shape[0] * self.shape[1])

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def to(self, device: torch.device | str) -> "QuantizedWeight":
        """The same weight with every tensor on `device` (dtypes unchanged); self when already there."""
        device = torch.device(device)
        if self.codes.device == device:
            return self
        return _moved(self, device)

    # ---- serialisation: flat tensors + JSON-able metadata (the native format lives in lowbit.io)

    def to_state(self) -> tuple[Tensors, dict]:
        pack_codes = getattr(self.grid, "pack_codes", None)
        t = pack_codes(self.codes) if pack_codes else {"qweight": packing.pack(self.codes, self.grid.bits)}
        t.update({f"grid.{k}": v for k, v in self.grid.tensors().items()})
        if self.outliers is not None:
            out_t, out_meta = self.outliers.tensors(self.shape)
            t.update(out_t)
        if self.lowrank is not None:
            t.update(self.lowrank.tensors())
        if self.in_scale is not None:
            t["in_scale"] = self.in_scale
        meta = {"shape": list(self.shape), "dtype": str(self.dtype).removeprefix("torch."), "grid": self.grid.meta()}
        if self.lowrank is not None and self.lowrank.meta() is not None:
            meta["lowrank"] = self.lowrank.meta()
        if self.outliers is not None:
            meta["outliers"] = out_meta
        return {k: v.contiguous() for k, v in t.items()}, meta

    @classmethod
    def from_state(cls, t: Tensors, meta: dict) -> "QuantizedWeight":
        try:
            shape = tuple(int(s) for s in meta["shape"])
            gmeta = meta["grid"]
            grid_cls = GRIDS[gmeta["kind"]]
            grid = grid_cls.from_state(gmeta, {k[5:]: v for k, v in t.items() if k.startswith("grid.")}, shape)
            unpack_codes = getattr(grid, "unpack_codes", None)
            codes = unpack_codes(t, shape) if unpack_codes else packing.unpack(t["qweight"], grid.bits, shape[1])
            outliers = Outliers.from_state(meta.get("outliers"), t, shape) if "outliers.values" in t else None
            lowrank = LowRank.from_state(meta.get("lowrank"), t) if "lowrank.A" in t else None
            dtype = getattr(torch, meta["dtype"])
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as e:
            raise LowbitError(f"corrupt quantized weight record: {e!r}") from e
        if codes.shape[0] != shape[0]:
            raise LowbitError(f"corrupt quantized weight record: {codes.shape[0]} rows, {shape[0]} expected")
        qw = cls(shape, dtype, grid, codes, outliers, lowrank, t.get("in_scale"))
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
            if g.float_zero:
                need(g.zero.dtype == torch.float16 and not g.symmetric, f"{g.zero.dtype} zeros of a "
                     f"{'symmetric' if g.symmetric else 'asymmetric'} grid (float zeros: fp16, asymmetric)")
                need(bool(torch.isfinite(g.zero).all()), "non-finite zero points")
            if g.g_idx is not None:
                need(g.group_size > 0 and tuple(g.g_idx.shape) == (cols,), f"g_idx shape {tuple(g.g_idx.shape)}")
                need(cols == 0 or (0 <= int(g.g_idx.min()) and int(g.g_idx.max()) < G), "g_idx out of range")
        elif isinstance(g, (CodebookGrid, AdditiveGrid, SignGrid)):
            g.check(self.shape, self.codes)
        else:
            need(g.block_size > 0, f"block size {g.block_size}")
            blocks = (rows, -(-cols // g.block_size))  # a short last block when the size does not divide
            need(tuple(g.exponent.shape) == blocks, f"exponent shape {tuple(g.exponent.shape)}, {blocks} expected")
        if self.outliers is not None:
            i, v = self.outliers.index, self.outliers.values
            need(i.ndim == 1 and i.shape == v.shape, f"outlier index {tuple(i.shape)} / values {tuple(v.shape)}")
            need(i.numel() == 0 or (0 <= int(i.min()) and int(i.max()) < rows * cols), "outlier index out of range")
            need(i.numel() < 2 or bool((i[1:] > i[:-1]).all()), "outlier positions repeat")
        if self.in_scale is not None:
            s = self.in_scale
            need(s.dtype == torch.float16 and tuple(s.shape) == (cols,),
                 f"in_scale {s.dtype} {tuple(s.shape)}, float16 ({cols},) expected")
            need(bool((torch.isfinite(s) & (s > 0)).all()), "in_scale must be finite and positive")
        if self.lowrank is not None:
            A, B = self.lowrank.A, self.lowrank.B
            need(A.ndim == 2 and B.ndim == 2 and A.shape[0] == cols and B.shape[1] == rows
                 and A.shape[1] == B.shape[0], f"low-rank A {tuple(A.shape)}, B {tuple(B.shape)} for {self.shape}")
            bad = self.lowrank.check()
            need(bad is None, bad)


def _moved(obj, device: torch.device):
    """A copy of a (nested) dataclass with every tensor field on `device`."""
    import dataclasses

    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _moved(getattr(obj, f.name), device)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


REMOVED = "removed/"  # prefix of a deleted layer's name in `original_shapes`


def bit_counts(qweights: dict[str, QuantizedWeight], original_shapes: dict | None = None) -> dict:
    """Every stored bit of a model's quantized layers over their ORIGINAL element count (`original_shapes`
    name → [out, in] before structured pruning; a pruned channel stores nothing; a linear of a deleted
    layer is listed as `removed/<its original name>` and counts in the original total) and over the
    stored one."""
    import math

    shapes = original_shapes or {}
    bits = sum(sum(q.storage().values()) for q in qweights.values())
    stored = sum(q.shape[0] * q.shape[1] for q in qweights.values())
    orig = (sum(math.prod(shapes.get(n, q.shape)) for n, q in qweights.items())
            + sum(math.prod(s) for n, s in shapes.items() if n.startswith(REMOVED)))
    return {"bits_per_weight": bits / orig if orig else 0.0,
            "bits_per_stored_weight": bits / stored if stored else 0.0,
            "stored_bits": bits, "original_params": orig, "stored_params": stored}

