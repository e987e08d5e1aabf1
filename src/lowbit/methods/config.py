"""One pydantic config per method: the same object in Python, in YAML recipes and behind CLI flags."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lowbit.formats.quant_primitives import SUPPORTED_BITS


ScaleKind = Literal["none", "act-mean", "act-rms", "exact"]


class LQERConfig(BaseModel):
    """Low-rank reconstruction of the quantization error (LQER / L²QER), applied on top of any base grid."""

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(32, ge=1)
    scale: ScaleKind = "act-mean"  # none = LQER; act-mean = L²QER; act-rms; exact = R_xx^½ (QERA)
    svd: Literal["auto", "full", "randomized"] = "auto"  # auto: randomized when rank ≪ min(in, out)
    oversample: int = Field(16, ge=0)  # extra random directions of the randomized range finder
    power_iters: int = Field(4, ge=0)  # subspace iterations: the error spectrum decays slowly
    seed: int = 0
    factor_dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
    exact_damp: float = Field(1e-6, ge=0)  # eigenvalue floor of R, relative to its mean, for R^-½


class WeightQuantConfig(BaseModel):
    """Settings every weight quantizer shares.

    group_size: −1 per output channel, 0 per tensor, g > 0 groups of g input columns (must divide the
    input dimension of every quantized layer).
    """

    model_config = ConfigDict(extra="forbid")

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    lqer: LQERConfig | None = None  # optional low-rank error correction on top of this grid

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if v not in SUPPORTED_BITS:
            raise ValueError(f"unsupported bit width {v}: choose one of {SUPPORTED_BITS}")
        return v

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v < -1:
            raise ValueError(f"group size {v} is invalid: use -1 (per channel), 0 (per tensor) or > 0")
        return v


class RTNConfig(WeightQuantConfig):
    """Round-to-nearest onto a min-max grid: uniform integers, or MXINT blocks (LQER's format)."""

    method: Literal["rtn"] = "rtn"
    format: Literal["int", "mxint"] = "int"
    # MXINT only: elements per shared exponent and the exponent's width (LQER: 16 and 8).
    block_size: int = 16
    exp_bits: int = 8

    @model_validator(mode="after")
    def _mx(self):
        if self.format == "mxint" and self.block_size < 1:
            raise ValueError("MXINT block size must be positive")
        return self


class GPTQConfig(WeightQuantConfig):
    """GPTQ (Frantar et al., 2023) as in the reference code IST-DASLab/gptq."""

    method: Literal["gptq"] = "gptq"
    damp_percent: float = 0.01  # λ = damp_percent · mean(diag H)
    block_size: int = 128  # lazy batch update width B
    act_order: bool = True  # columns by descending diag(H)
    # Group params from the original W (reference `--static-groups`): act-order then needs no g_idx, so
    # GPTQ stores exactly what RTN stores and the two compare at matched bits. Dynamic groups cost
    # 32 bits per input column for g_idx (0.125 bpw on a 256-wide layer).
    static_groups: bool = True

    @field_validator("damp_percent")
    @classmethod
    def _damp(cls, v: float) -> float:
        if not 0 <= v < 1:
            raise ValueError("damp_percent must be in [0, 1)")
        return v


MethodConfig = RTNConfig | GPTQConfig
