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

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lowbit.allocate.config import BudgetConfig
from lowbit.errors import LowbitError
from lowbit.calibration import CalibrationConfig
from lowbit.methods import MethodConfigField, switch_method
from lowbit.methods.config import GPTQConfig
from lowbit.patterns import check_pattern
from lowbit.pipeline.stages import FinetuneStageConfig
from lowbit.prune.config import PruneConfig


class Override(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pattern: str
    config: dict

    @field_validator("pattern")
    @classmethod
    def _regex(cls, v: str) -> str:
        return check_pattern(v)


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
        return [check_pattern(p) for p in v]

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


def apply_settings(recipe: Recipe, assignments: list[str]) -> Recipe:
    """`KEY=VALUE` assignments (the CLI's `--set`, `cli_options.assign`) on top of a recipe: KEY a dotted
    path into it (`quant.damp_percent`, `quant.kmeans.max_iter`, `calibration.n_samples`, `finetune.steps`).
    Every setting of every registered method is reachable this way, validated by the method's own config;
    a method switch (`quant.method=...`) comes first and keeps what `methods.switch_method` keeps."""
    from lowbit.cli_options import assign

    d = assign(recipe.model_dump(), assignments, on_switch={("quant", "method"): switch_method})
    return make_recipe(d, source="--set settings")


def merge(recipe: Recipe, quant: dict, calibration: dict) -> Recipe:
    """Apply explicitly given CLI flags on top of a recipe. Changing `method` starts a fresh method config
    that keeps the shared keys (`methods.switch_method`)."""
    q = recipe.quant.model_dump()
    if "method" in quant and quant["method"] != q["method"]:
        q = switch_method(q, quant["method"])
    q.update(quant)
    c = recipe.calibration.model_dump()
    c.update(calibration)
    d = recipe.model_dump()
    d["quant"], d["calibration"] = q, c
    return make_recipe(d, source="settings")
