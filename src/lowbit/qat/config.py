"""One pydantic config per QAT method, plus the training settings they share.

The same objects back the `lowbit finetune` flags, the checkpoint fingerprint and the `quantization_config`
of the exported model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from lowbit.errors import LowbitError, config_error
from lowbit.methods.config import Bits, GroupSize


class _QATBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bits: Bits = 4
    group_size: GroupSize = 128  # −1 per output channel, 0 per tensor, g > 0 groups of g input columns
    rank: int = Field(4, ge=1)  # L4Q's default (App. D): rank barely matters above 4
    alpha: float = Field(1.0, gt=0)  # the adapter is scaled by alpha / rank


class L4QConfig(_QATBase):
    """L4Q: W_q = Q(W₀ + (α/r)·B·A) with learned per-group step s and offset b (LSQ / LSQ+)."""

    method: Literal["l4q"] = "l4q"
    # Start: "none" = L4Q_init (s from min/max of W₀, b = 0; the paper's); "rtn" = lowbit's asymmetric
    # min-max grid (step 0 exports exactly `lowbit quantize --method rtn`); "gptq" = W₀ := GPTQ's Ŵ and
    # its grid (step 0 exports exactly the GPTQ model).
    init_from: Literal["none", "rtn", "gptq"] = "none"
    learn_offset: bool = True  # LSQ+ offset b; off = symmetric grid, b = 0 frozen
    grad_scale: Literal["lsq", "none"] = "lsq"  # LSQ's g = 1/√(N·Q_P) on the s and b gradients
    base_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"  # storage of frozen W₀ (paper: bf16)


class LSQConfig(_QATBase):
    """Full-weight QAT with LSQ/LSQ+ (every weight trainable): the memory baseline of the L4Q paper."""

    method: Literal["lsq"] = "lsq"
    init_from: Literal["none", "rtn"] = "none"
    learn_offset: bool = True
    grad_scale: Literal["lsq", "none"] = "lsq"


class LRQATConfig(_QATBase):
    """LR-QAT: Ŵ = s·(clamp(⌊Φ₀ + (α/r)·A·B⌉ + z₀) − z₀), Φ₀ = φ(W₀/s₀) frozen, s learned."""

    method: Literal["lr-qat"] = "lr-qat"
    # "none"/"rtn": s₀, z₀ from lowbit's min-max grid of W₀ (step 0 = RTN); "gptq": Φ₀ = GPTQ's integer
    # codes − z₀ with GPTQ's s₀ (step 0 = the GPTQ model).
    init_from: Literal["none", "rtn", "gptq"] = "none"
    symmetric: bool = False  # the paper's main runs are symmetric; asymmetric matches lowbit's RTN/GPTQ
    phi: Literal["fp32", "bf16", "fp16", "fixed8", "int"] = "fp32"
    learn_scale: bool = True


class QLoRAConfig(_QATBase):
    """QLoRA-style baseline: LoRA beside a frozen PTQ weight; exported as grid + fp16 (or int8) LowRank term."""

    method: Literal["qlora"] = "qlora"
    init_from: Literal["rtn", "gptq"] = "gptq"  # the PTQ base (L4Q's QLoRA* is GPTQ + LoRA)
    symmetric: bool = False
    # storage of the exported adapter: fp16, or int8 codes + fp16 per-row scales (rounded after training)
    adapter_dtype: Literal["fp16", "int8"] = "fp16"


class LoRAConfig(_QATBase):
    """Plain LoRA on the float model (no quantization): the memory reference. Exports merged float weights."""

    method: Literal["lora"] = "lora"


class OneBitConfig(BaseModel):
    """OneBit: sign(W) ⊙ h·gᵀ from SVID, a parameter-free LayerNorm after each linear, trained by KD
    (train with `loss: kd` and `kd_hidden: 1`, the paper's objective)."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["onebit"] = "onebit"
    post_norm: bool = True  # the paper's Post-LN (without it the authors' training overflowed)
    latent_init: float = Field(0.01, gt=0)  # latent weight = latent_init·sign(W) (the authors' 0.01)


class LoQTScheduleConfig(BaseModel):
    """LoQT's merges (`qat.loqt.LoQTSchedule`), shared by `lowbit finetune --method loqt` and the recipe's
    loqt stage."""

    update_gap: int = Field(100, ge=1)  # τ: the first gap; later ones τ + ⌊ψ^k⌋
    gap_growth: float = Field(1.2, ge=1.0)  # ψ
    compensation_iters: int = Field(5, ge=0)  # C of the (Q, B) alternation; 0: Q = q(W), B = 0


class SpIELScheduleConfig(BaseModel):
    """SpIEL's index set (`qat.spiel.SpIELSchedule`), shared by `lowbit finetune --method spiel` and the
    recipe's spiel stage."""

    density: float = Field(0.01, gt=0, le=1)  # k / numel per layer (the paper's 1 %)
    reselect_every: int = Field(20, ge=1)  # R
    accumulate_steps: int = Field(5, ge=1)  # S: gradient accumulation window before a reselection
    drop_fraction: float = Field(0.2, ge=0, le=1)  # p₀, decayed linearly to 0 over training


class LoQTConfig(LoQTScheduleConfig):
    """LoQT: W_q + s·B·P trained (B only, P from the gradient's SVD), merged and re-quantized at growing gaps."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["loqt"] = "loqt"
    bits: Bits = 4
    group_size: GroupSize = 64  # the paper's NF4 blocks are 64 wide
    symmetric: bool = False
    rank: int = Field(16, ge=1)
    scale: float = Field(1.0, gt=0)  # s multiplies B·P as is (the authors' lora_alpha, not alpha/rank)
    # Merges round onto the grid of the first quantization (False), or refit min-max at every merge (True).
    regrid: bool = False
    export: Literal["requantize", "lowrank"] = "requantize"


class SpIELConfig(SpIELScheduleConfig):
    """SpIEL-AG: a sparse Δ at fixed density on the float or a quantized base, dropped by |δ| and regrown by
    accumulated |∇W| every `reselect_every` steps."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["spiel"] = "spiel"
    base: Literal["fp", "rtn", "gptq"] = "fp"  # rtn / gptq: quantized SpIEL on lowbit's grid
    bits: Bits = 4  # of a quantized base
    group_size: GroupSize = 128
    symmetric: bool = False


# The fine-tuning methods, declared once: `lowbit finetune --method`, its validation, `lowbit methods` and
# docs/methods.md come from this tuple (each class's `method` literal is its name, its docstring's first
# paragraph its summary).
CONFIGS = (L4QConfig, LRQATConfig, QLoRAConfig, LSQConfig, LoRAConfig, OneBitConfig, LoQTConfig, SpIELConfig)
METHODS = tuple(c.model_fields["method"].default for c in CONFIGS)


def method_names() -> list[str]:
    return list(METHODS)

QATConfig = Annotated[Union[CONFIGS], Field(discriminator="method")]
_ADAPTER: TypeAdapter = TypeAdapter(QATConfig)


class TrainConfig(BaseModel):
    """Optimisation, data and bookkeeping settings shared by every QAT method."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(100, ge=0)
    lr: float = Field(1e-3, gt=0)  # adapters (A, B) and full weights
    # Steps s and offsets b (None: same as lr). AdamW moves every parameter by about lr per step whatever
    # its gradient scale, so this must be small next to the steps themselves (1e-3–1e-1 here).
    lr_quant: float | None = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)  # AdamW, on A and B only (never on steps/offsets)
    warmup: float = Field(0.1, ge=0, le=1)  # linear warm-up over this fraction of steps, then cosine
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    grad_clip: float | None = Field(1.0, gt=0)
    batch_size: int = Field(4, ge=1)  # windows per optimizer step, over all processes
    micro_batch: int | None = Field(None, ge=1)  # windows per forward/backward (gradient accumulation)
    seqlen: int = Field(256, ge=8)
    loss: Literal["ce", "kd"] = "ce"  # next-token cross-entropy, or KL(teacher ‖ student) to the float model
    # kd only: + kd_hidden · Σ_layers ‖h_T/‖h_T‖ − h_S/‖h_S‖‖² per token, the hidden states of every decoder
    # block aligned after L2 normalisation (OneBit's second term, α = 1 in the paper)
    kd_hidden: float = Field(0.0, ge=0)
    dataset: Literal["c4", "text", "jsonl"] = "c4"
    data_path: str | None = None  # for text / jsonl
    eval_every: int = Field(0, ge=0)  # 0: only at the end
    eval_windows: int = Field(16, ge=1)
    checkpoint_every: int = Field(50, ge=0)  # 0: never (no resume)
    seed: int = 0

    def quant_lr(self) -> float:
        return self.lr if self.lr_quant is None else self.lr_quant


def parse_qat_config(d: dict) -> BaseModel:
    try:
        return _ADAPTER.validate_python(d)
    except ValidationError as e:
        raise config_error("finetune settings", e) from None


def parse_train_config(d: dict) -> TrainConfig:
    try:
        cfg = TrainConfig.model_validate(d)
    except ValidationError as e:
        raise config_error("training settings", e) from None
    if cfg.dataset in ("text", "jsonl"):
        if not cfg.data_path:
            raise LowbitError(f"dataset {cfg.dataset} needs a file (--data-file)")
        if not Path(cfg.data_path).is_file():
            raise LowbitError(f"training data file {cfg.data_path} does not exist")
    if cfg.micro_batch is not None and cfg.batch_size % cfg.micro_batch:
        raise LowbitError(f"micro batch {cfg.micro_batch} does not divide the batch size {cfg.batch_size}")
    return cfg
