"""The budget section of a recipe: what the allocator may choose per layer, and under which budget."""

from __future__ import annotations

import itertools

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lowbit.formats.quant_primitives import SUPPORTED_BITS
from lowbit.methods.config import LQERConfig


class BudgetConfig(BaseModel):
    """Per layer, one option from bits × group_sizes × ranks × outliers on the recipe's base method, or
    one of `methods`: whole method configs offered besides that grid (e.g. CLAQ 3-bit where its
    codebooks pay off), measured and counted exactly like the grid's options.

    bits_per_weight: the budget — every stored bit of every quantized linear (codes, scales, zeros,
    codebooks, outliers, low-rank factors) over their original element count.
    Sensitivity of (layer, option): KL(P_fp ‖ P) of the model with only that layer quantized, on the first
    `n_samples` calibration windows (the recipe's calibration data; a measurement, not a proxy). The plan
    minimises the sum over layers subject to the budget (exact multiple-choice knapsack by default).
    """

    model_config = ConfigDict(extra="forbid")

    bits_per_weight: float = Field(..., gt=0, le=32)
    bits: list[int] = Field(default_factory=lambda: [2, 3, 4])
    group_sizes: list[int] = Field(default_factory=lambda: [-1, 128, 64, 32])
    ranks: list[int] = Field(default_factory=lambda: [0, 8, 16, 32])
    outliers: list[float] = Field(default_factory=lambda: [0.0])  # fractions of entries kept in fp16
    lqer: LQERConfig = Field(default_factory=LQERConfig)  # the low-rank settings; `rank` comes from `ranks`
    methods: list[dict] = Field(default_factory=list)  # e.g. [{method: claq, bits: 3, codebook_bits: 8}]
    n_samples: int = Field(16, ge=1)
    batch_size: int = Field(8, ge=1)
    solver: str = Field("dp", pattern="^(dp|lagrangian)$")

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: list[int]) -> list[int]:
        bad = [b for b in v if b not in SUPPORTED_BITS]
        if not v or bad:
            raise ValueError(f"budget bits {v}: each must be one of {SUPPORTED_BITS}")
        return sorted(set(v))

    @field_validator("group_sizes")
    @classmethod
    def _groups(cls, v: list[int]) -> list[int]:
        if not v or any(g < -1 for g in v):
            raise ValueError(f"budget group sizes {v}: use -1 (per channel), 0 (per tensor) or g > 0")
        return list(dict.fromkeys(v))

    @field_validator("ranks")
    @classmethod
    def _ranks(cls, v: list[int]) -> list[int]:
        if not v or any(r < 0 for r in v):
            raise ValueError(f"budget ranks {v} must be ≥ 0 (0: no low-rank factors)")
        return sorted(set(v))

    @field_validator("outliers")
    @classmethod
    def _outliers(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 <= f < 0.5 for f in v):
            raise ValueError(f"budget outlier fractions {v} must lie in [0, 0.5)")
        return sorted(set(v))

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[dict]) -> list[dict]:
        """Validated now, and stored with the keys a method switch would otherwise carry over from the base
        (bits, group size, symmetry; `models.adapters.merge_config`) made explicit."""
        from lowbit.errors import LowbitError
        from lowbit.methods import parse_method_config

        out = []
        for d in v:
            if "method" not in d:
                raise ValueError(f"budget methods: {d!r} must be a method config with a 'method' key")
            try:
                full = parse_method_config(d).model_dump(mode="json")
            except LowbitError as e:
                raise ValueError(f"budget methods: {e}") from None
            out.append({**d, **{k: full[k] for k in ("bits", "group_size", "symmetric") if k in full}})
        return out

    def options(self, method: str) -> list[dict]:
        """Every option as a partial method config (merged over the recipe's `quant` by
        `models.adapters.merge_config`): the grid on the base method, then `methods`. Codebook methods
        (one codebook per vector) have no group size to choose."""
        groups = [-1] if method in ("claq", "squeezellm") else self.group_sizes
        out = []
        for b, g, f, r in itertools.product(self.bits, groups, self.outliers, self.ranks):
            o: dict = {"bits": b, "group_size": g}
            if f > 0:
                o["outliers"] = f
            o["lqer"] = self.lqer.model_copy(update={"rank": r, "rank_energy": None, "target_bits": None}).model_dump() if r else None
            out.append(o)
        return out + [dict(m) for m in self.methods]


_SHORT = {"codebook_bits": "cb", "target_bits": "ap", "row_scale": "rs-", "outliers": "or-"}


def describe(option: dict) -> str:
    """A short label: 'w3 g128 r16 o0.5%', or for a method option 'claq w3 pc cb8'."""
    g = option["group_size"]
    s = f"w{option['bits']} " + ("pc" if g == -1 else "pt" if g == 0 else f"g{g}")
    if "method" in option:
        rest = {k: v for k, v in option.items() if k not in ("method", "bits", "group_size", "symmetric", "lqer")}
        return " ".join([f"{option['method']} {s}"] + [f"{_SHORT.get(k, k + '=')}{v}" for k, v in sorted(rest.items())])
    if option.get("lqer"):
        s += f" r{option['lqer']['rank']}"
    if option.get("outliers"):
        s += f" o{100 * option['outliers']:g}%"
    return s
