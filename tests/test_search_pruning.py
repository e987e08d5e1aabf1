"""The efficient-LLM structure search: mask mutation's overlap guarantee, and the evolutionary search
finding the brute-forced optimum of a small budgeted, non-separable problem."""

from __future__ import annotations

import itertools
import math
import random

import torch

from lowbit.prune.search import evolve, mask_mutation


def test_mask_mutation_keeps_the_overlap():
    rng = random.Random(0)
    cur = torch.tensor(sorted(rng.sample(range(100), 40)))
    for n_new in (20, 40, 60):
        for _ in range(20):
            new = mask_mutation(cur, n_new, 100, 0.8, rng)
            assert new.numel() == n_new == len(set(new.tolist())) and int(new.max()) < 100
            overlap = len(set(new.tolist()) & set(cur.tolist()))
            assert overlap >= math.ceil(0.8 * min(40, n_new))


def test_evolution_finds_the_brute_force_optimum():
    g = torch.Generator().manual_seed(0)
    units, size, budget = 3, 4, 7  # keep at most 7 of 12 structures, at least 1 per unit
    w = torch.rand(units, size, generator=g) * 2 - 0.5  # value of keeping each structure
    inter = torch.rand(units, size, generator=g)  # extra value when neighbouring units keep the same index

    def fitness(sets):
        keep = torch.zeros(units, size)
        for u, s in enumerate(sets):
            keep[u, s] = 1
        return -float((w * keep).sum() + (inter[:-1] * keep[:-1] * keep[1:]).sum())

    subsets = [torch.tensor(c) for n in range(1, size + 1) for c in itertools.combinations(range(size), n)]
    feasible = [combo for combo in itertools.product(subsets, repeat=units) if sum(s.numel() for s in combo) <= budget]
    best = min(feasible, key=lambda combo: fitness(list(combo)))
    start = [torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([0, 1])]
    found = evolve(fitness, start, [size] * units, [[1, 2, 3, 4]] * units, lambda counts: sum(counts), budget,
                   generations=40, population=20, parents=5, mutations=12, crossovers=6, p_mutate=0.5, alpha=0.5,
                   seed=0)
    assert found.fitness == fitness(list(best)), (found.sets, best)
    assert sum(s.numel() for s in found.sets) <= budget
