"""Additive multi-codebook vector quantization (AQLM, Egiazarian et al., ICML 2024): each row is cut into
vectors of `in_group_size` (g) consecutive input columns, and every vector is a sum of one codeword from
each of M codebooks, times a per-output-row scale:

    ŵ[r, j·g : (j+1)·g] = s_r · Σ_{m<M} C_m[b[r, j, m]],    C_m: 2^B codewords of length g

("MxB g": 2x8 g8 = two 256-entry codebooks of 8-vectors, 2 bits per weight in the codes.) Stored: the codes
(B bits each, packed; B = 16 as uint16), the codebooks in fp16 and the row scales in fp16 — all counted:

    bits/weight = (rows·(cols/g)·M·B + M·2^B·g·16 + rows·16) / (rows·cols)

Codes are kept in memory as [rows, cols/g, M] (uint8 for B ≤ 8, int32 for B = 16); `QuantizedWeight`
asks the grid for that shape (`code_shape`). The algorithm that makes them is `methods.aqlm`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lowbit.errors import LowbitError
from lowbit.formats import packing

Tensors = dict[str, torch.Tensor]
CODE_BITS = (1, 2, 3, 4, 5, 6, 7, 8, 16)  # packed bitstreams up to 8 bits; 16: plain uint16


def additive_vectors(codebooks: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Σ_m C_m[b[..., m]]: codebooks [M, K, g], codes [..., M] → [..., g] in the codebooks' dtype."""
    out = codebooks[0][codes[..., 0].long()]
    for m in range(1, codebooks.shape[0]):
        out = out + codebooks[m][codes[..., m].long()]
    return out


@dataclass
class AdditiveGrid:
    num_codebooks: int
    nbits_per_codebook: int
    in_group_size: int
    codebooks: torch.Tensor  # fp16 [M, 2^B, g]
    scale: torch.Tensor  # fp16 [rows]
    kind: str = field(default="additive", init=False)

    @property
    def bits(self) -> int:
        """Code width (each of the M codes per vector)."""
        return self.nbits_per_codebook

    def code_shape(self, shape: tuple[int, int]) -> tuple[int, int, int]:
        return (shape[0], shape[1] // self.in_group_size, self.num_codebooks)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        rows, J, _ = codes.shape
        v = additive_vectors(self.codebooks.float(), codes)  # summed in float32
        return (v * self.scale.float()[:, None, None]).reshape(rows, J * self.in_group_size)

    def codes_storage(self, shape: tuple[int, int]) -> int:
        rows, J, M = self.code_shape(shape)
        B = self.nbits_per_codebook
        return rows * (J * M * 16 if B == 16 else packing.packed_words(J * M, B) * 32)

    def storage(self) -> dict[str, int]:
        return {"codebooks": self.codebooks.numel() * 16, "scales": self.scale.numel() * 16}

    def meta(self) -> dict:
        return {"kind": self.kind, "num_codebooks": self.num_codebooks, "nbits_per_codebook": self.nbits_per_codebook,
                "in_group_size": self.in_group_size}

    def tensors(self) -> Tensors:
        return {"codebooks": self.codebooks, "scale": self.scale}

    def pack_codes(self, codes: torch.Tensor) -> Tensors:
        flat = codes.reshape(codes.shape[0], -1)
        if self.nbits_per_codebook == 16:
            return {"qweight": flat.to(torch.int32).to(torch.uint16).view(torch.int16)}
        return {"qweight": packing.pack(flat.to(torch.uint8), self.nbits_per_codebook)}

    def unpack_codes(self, t: Tensors, shape: tuple[int, int]) -> torch.Tensor:
        rows, J, M = self.code_shape(shape)
        q = t["qweight"]
        if self.nbits_per_codebook == 16:
            flat = q.view(torch.uint16).to(torch.int32)
        else:
            flat = packing.unpack(q, self.nbits_per_codebook, J * M)
        return flat.reshape(rows, J, M)

    @classmethod
    def from_state(cls, meta: dict, t: Tensors, shape: tuple[int, int]) -> "AdditiveGrid":
        M, B, g = int(meta["num_codebooks"]), int(meta["nbits_per_codebook"]), int(meta["in_group_size"])
        if M < 1 or B not in CODE_BITS or g < 1:
            raise LowbitError(f"additive grid metadata {meta} is invalid")
        return cls(M, B, g, t["codebooks"], t["scale"])

    def check(self, shape: tuple[int, int], codes: torch.Tensor | None = None) -> None:
        rows, cols = shape
        M, B, g = self.num_codebooks, self.nbits_per_codebook, self.in_group_size

        def need(ok, what):
            if not ok:
                raise LowbitError(f"corrupt quantized weight record: {what}")

        need(g >= 1 and cols % g == 0, f"input dimension {cols} is not a multiple of the vector length {g}")
        need(tuple(self.codebooks.shape) == (M, 2**B, g),
             f"codebooks {tuple(self.codebooks.shape)}, {(M, 2**B, g)} expected")
        need(tuple(self.scale.shape) == (rows,), f"row scales {tuple(self.scale.shape)}, ({rows},) expected")
        need(bool(torch.isfinite(self.codebooks).all() and torch.isfinite(self.scale).all()),
             "non-finite codebooks / scales")
        if codes is not None:
            need(tuple(codes.shape) == self.code_shape(shape), f"codes {tuple(codes.shape)}, {self.code_shape(shape)} expected")
            need(codes.numel() == 0 or (int(codes.min()) >= 0 and int(codes.max()) < 2**B), "a code exceeds its width")
