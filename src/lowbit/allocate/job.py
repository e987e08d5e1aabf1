"""The budgeted run: measure, solve, and hand back the plan recipe that the normal pipeline then runs."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lowbit.allocate.plan import Plan, plan_recipe, solve
from lowbit.allocate.sensitivity import Sensitivity, measure_sensitivity
from lowbit.errors import LowbitError
from lowbit.models.adapters import LayerPlan, get_adapter
from lowbit.recipe import Recipe


def target_layers(model: nn.Module, recipe: Recipe) -> list[str]:
    """The linears the pipeline would quantize under the recipe's include/ignore, in pipeline order."""
    adapter = get_adapter(model)
    lp = LayerPlan(recipe.quant, recipe.include or None, recipe.ignore or None)
    names = [n for bn, b in adapter.blocks(model) for g in adapter.groups(model, bn, b) for n in g if lp.selected(n)]
    if not names:
        raise LowbitError("include/ignore patterns leave no layer to quantize")
    return names


def run_budget(model: nn.Module, recipe: Recipe, calib: torch.Tensor | None, *,
               cache: str | Path | None = None, progress: bool = False) -> tuple[Plan, Recipe, Sensitivity]:
    """(plan, the recipe reproducing it, the sensitivity tables) for `recipe.budget`. The model is left
    exactly as it was (each measured layer's weight is restored)."""
    budget = recipe.budget
    if budget is None:
        raise LowbitError("the recipe has no budget section (use --budget-bits)")
    names = target_layers(model, recipe)
    options = budget.options(recipe.quant.method)
    sens = measure_sensitivity(model, names, calib, recipe.quant, options, n_samples=budget.n_samples,
                               batch_size=budget.batch_size, cache=cache, progress=progress)
    plan = solve(sens, budget)
    return plan, plan_recipe(plan, recipe), sens
