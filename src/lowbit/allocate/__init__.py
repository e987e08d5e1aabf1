"""Budgeted allocation: per layer, the quantization option that minimises the model's loss increase subject
to an average bits-per-weight budget.

config (what may be chosen) → sensitivity (measured KL per layer and option) → knapsack (the exact
choice) → plan (the choice written as a recipe). `run_budget` in `lowbit.allocate.job` ties them together.
"""
