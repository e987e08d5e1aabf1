"""From measured sensitivities to a recipe: solve the knapsack, then write the plan as overrides.

The plan is an ordinary recipe (one override per layer, exact-name patterns) with a comment header that
lists each layer's choice, its bits and its measured KL, so `lowbit quantize --recipe plan.yaml` reproduces
the budgeted model with no search, and a reader sees where the bits went.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import yaml

from lowbit.allocate.config import BudgetConfig, describe
from lowbit.allocate.knapsack import solve_dp, solve_lagrangian
from lowbit.allocate.sensitivity import Sensitivity
from lowbit.recipe import Override, Recipe


@dataclass
class Plan:
    sensitivity: Sensitivity
    choice: list[int]  # option index per layer
    budget_bits: float

    @property
    def bits_per_weight(self) -> float:
        s = self.sensitivity
        return float(sum(s.bits[i, o] for i, o in enumerate(self.choice)) / sum(s.numel))

    @property
    def predicted_kl(self) -> float:
        """Σ_l d[l, o_l]: the additive prediction, to compare with the measured KL of the result."""
        return float(sum(self.sensitivity.kl[i, o] for i, o in enumerate(self.choice)))

    def rows(self) -> list[dict]:
        s = self.sensitivity
        return [{"layer": n, "option": describe(s.options[o]), "bits_per_weight": s.bits[i, o] / s.numel[i],
                 "kl": s.kl[i, o]} for i, (n, o) in enumerate(zip(s.layers, self.choice))]


def solve(sens: Sensitivity, budget: BudgetConfig) -> Plan:
    capacity = budget.bits_per_weight * sum(sens.numel)
    solver = solve_dp if budget.solver == "dp" else solve_lagrangian
    choice = solver(sens.kl, sens.bits, capacity)
    return Plan(sens, [int(c) for c in choice], budget.bits_per_weight)


def plan_recipe(plan: Plan, recipe: Recipe) -> Recipe:
    """The recipe that reproduces the plan: the base method, then one exact-name override per layer.
    The budget section is dropped (the search is done); calibration, include and ignore are kept."""
    s = plan.sensitivity
    overrides = [Override(pattern=f"^{re.escape(n)}$", config=s.options[o]) for n, o in zip(s.layers, plan.choice)]
    return recipe.model_copy(update={"budget": None, "overrides": list(recipe.overrides) + overrides})


def plan_yaml(plan: Plan, recipe: Recipe) -> str:
    """The plan recipe as YAML, headed by a readable table of the choices (comments are ignored on load)."""
    rows = plan.rows()
    w = max(len(r["layer"]) for r in rows)
    lines = [f"# lowbit budgeted plan: {plan.bits_per_weight:.4f} bits/weight (budget {plan.budget_bits}), "
             f"all metadata counted; predicted KL (sum of per-layer measured KLs) {plan.predicted_kl:.3e}",
             f"# sensitivity: KL(fp ‖ one layer quantized) on {plan.sensitivity.meta.get('n_samples')} calibration "
             f"windows of {plan.sensitivity.meta.get('seqlen')} tokens",
             f"# {'layer'.ljust(w)}  {'choice'.ljust(18)}  bits/w   KL"]
    lines += [f"# {r['layer'].ljust(w)}  {r['option'].ljust(18)}  {r['bits_per_weight']:.3f}  {r['kl']:.3e}" for r in rows]
    body = yaml.safe_dump(plan_recipe(plan, recipe).model_dump(mode="json", exclude={"budget"}), sort_keys=False)
    return "\n".join(lines) + "\n" + body
