"""Sign codes with a rank-1 magnitude (OneBit, Xu et al., NeurIPS 2024): one bit per weight,

    ŵ[r, c] = h_r · (2·q[r, c] − 1) · g_c,      q ∈ {0, 1}  (1: +1, 0: −1),

h [out] and g [in] in fp16. The layer that runs it normalises its output: y = LayerNorm(x·Ŵᵀ) + bias with
a parameter-free LayerNorm over the output features (OneBit's "Post-LN", `post_norm`); `QuantLinear`
applies it, and exporters that write a plain dense checkpoint refuse such layers (no dense weight computes
what they compute). Bits: 1 per weight plus 16·(out + in) per layer (1.0078 on a 4096² layer).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lowbit.errors import LowbitError

Tensors = dict[str, torch.Tensor]


@dataclass
class SignGrid:
    row_scale: torch.Tensor  # h, fp16 [out]
    col_scale: torch.Tensor  # g, fp16 [in]
    post_norm: bool = True
    kind: str = field(default="sign", init=False)

    @property
    def bits(self) -> int:
        return 1

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        signs = codes.float() * 2 - 1
        return self.row_scale.float()[:, None] * signs * self.col_scale.float()[None, :]

    def storage(self) -> dict[str, int]:
        return {"scales": (self.row_scale.numel() + self.col_scale.numel()) * 16}

    def meta(self) -> dict:
        return {"kind": self.kind, "post_norm": self.post_norm}

    def tensors(self) -> Tensors:
        return {"row_scale": self.row_scale, "col_scale": self.col_scale}

    @classmethod
    def from_state(cls, meta: dict, t: Tensors, shape: tuple[int, int]) -> "SignGrid":
        return cls(t["row_scale"], t["col_scale"], bool(meta.get("post_norm", True)))

    def check(self, shape: tuple[int, int], codes: torch.Tensor | None = None) -> None:
        rows, cols = shape

        def need(ok, what):
            if not ok:
                raise LowbitError(f"corrupt quantized weight record: {what}")

        need(tuple(self.row_scale.shape) == (rows,), f"row scales {tuple(self.row_scale.shape)}, ({rows},) expected")
        need(tuple(self.col_scale.shape) == (cols,), f"column scales {tuple(self.col_scale.shape)}, ({cols},) expected")
        need(bool(torch.isfinite(self.row_scale).all() and torch.isfinite(self.col_scale).all()), "non-finite scales")
        if codes is not None:
            need(codes.numel() == 0 or int(codes.max()) <= 1, "sign codes above 1")
