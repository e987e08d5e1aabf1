"""Recipes: one validated object holding every setting of a quantization run.

The same keys come from a YAML file (`--recipe`) or from CLI flags; flags given explicitly win over
the file. Example:

    quant: {method: gptq, bits: 3, group_size: 128, act_order: true}
    calibration: {dataset: c4, n_samples: 128, seqlen: 256, seed: 0}
    ignore: ['.*\\.mlp\\.down_proj']
    overrides:
      - {pattern: 'model\\.layers\\.0\\..*', config: {bits: 4}}
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lowbit.allocate.config import BudgetConfig
from lowbit.errors import LowbitError
from lowbit.eval.protocol import DEFAULT_SEQLEN
from lowbit.methods import MethodConfigField
from lowbit.methods.config import GPTQConfig
from lowbit.pipeline.stages import FinetuneStageConfig
from lowbit.prune.config import PruneConfig


class CalibrationConfig(BaseModel):
    """Where calibration windows come from (GPTQ recipe: random windows of random documents)."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = "c4"  # c4 | wikitext2-valid | text | jsonl | hf:NAME[:SPLIT] (lowbit.calibration)
    path: str | None = None  # for dataset text / jsonl
    chat: bool = False  # render every example through the tokenizer's chat template
    n_samples: int = Field(128, ge=1)
    seqlen: int | None = Field(DEFAULT_SEQLEN, ge=8)  # None: min(2048, the model's max positions)
    seed: int = 0

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str) -> str:
        from lowbit.calibration import check_dataset

        return check_dataset(v)


class Override(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pattern: str
    config: dict

    @field_validator("pattern")
    @classmethod
    def _regex(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"invalid regex {v!r}: {e}") from e
        return v


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    quant: MethodConfigField = Field(default_factory=GPTQConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    include: list[str] = Field(default_factory=list)
    ignore: list[str] = Field(default_factory=list)
    overrides: list[Override] = Field(default_factory=list)
    budget: BudgetConfig | None = None  # budgeted per-layer allocation (lowbit.allocate); None: as written
    # model-level stages around the quantizer (lowbit.pipeline.stages): UDFC pruning before it, fine-tuning after
    prune: PruneConfig | None = None
    finetune: FinetuneStageConfig | None = None

    @field_validator("include", "ignore")
    @classmethod
    def _regexes(cls, v: list[str]) -> list[str]:
        for p in v:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"invalid regex {p!r}: {e}") from e
        return v

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _explain(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    return f"{where}: {err['msg']}" if where else err["msg"]


def load_recipe(path: str | Path) -> Recipe:
    p = Path(path)
    if not p.is_file():
        raise LowbitError(f"recipe file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise LowbitError(f"recipe {p} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise LowbitError(f"recipe {p} must be a mapping of settings")
    return make_recipe(data, source=str(p))


def make_recipe(data: dict, source: str = "settings") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise LowbitError(f"invalid {source}: {_explain(e)}") from e


def merge(recipe: Recipe, quant: dict, calibration: dict) -> Recipe:
    """Apply explicitly given CLI flags on top of a recipe. Changing `method` starts a fresh method config
    that keeps the shared keys (bits, group_size, symmetric)."""
    q = recipe.quant.model_dump()
    if "method" in quant and quant["method"] != q["method"]:
        q = {k: q[k] for k in ("bits", "group_size", "symmetric")}
    q.update(quant)
    c = recipe.calibration.model_dump()
    c.update(calibration)
    d = recipe.model_dump()
    d["quant"], d["calibration"] = q, c
    return make_recipe(d, source="settings")
