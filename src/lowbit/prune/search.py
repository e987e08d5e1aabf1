"""Training-free search for per-layer structures (Shen et al., NeurIPS 2024, "Search for Efficient LLMs").

A candidate is, per decoder layer, the set of KV groups and the set of MLP channels it keeps. The search:
1. starts every layer at the same keep ratio with the sets chosen by an importance score;
2. evolves a population: mutation changes a layer's ratio (from a grid) and re-samples its set with
   **mask mutation** (the new set overlaps the old by ≥ α of the smaller one, so a child stays near its
   parent), crossover takes each layer from one parent or the other; candidates over the parameter budget
   are discarded; the best `parents` survive each generation;
3. fitness = the masked model's loss on a few calibration windows (lower is better);
4. the winner's kept weights are re-formed (`structured.compensate`: min ‖Ŵ x − W x‖² over Ŵ with the
   pruned input columns zero — the objective the paper solves by ADMM, here in closed form).

Departures: the paper samples index sets until the overlap holds (up to 1000 tries); `mask_mutation`
samples the constraint set directly (keep ⌈α·min⌉ of the old set at random, fill the rest at random),
which always succeeds. The per-block depth search is not built (layers are kept).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable

import torch


def mask_mutation(current: torch.Tensor, n_new: int, n_total: int, alpha: float, rng: random.Random) -> torch.Tensor:
    """A sorted index set of size n_new in [0, n_total) sharing ≥ ⌈α·min(|current|, n_new)⌉ indices with
    `current`."""
    cur = current.tolist()
    m = min(len(cur), n_new)
    keep_n = min(m, math.ceil(alpha * m))
    kept = rng.sample(cur, keep_n)
    taken = set(kept)
    rest = [i for i in range(n_total) if i not in taken]
    return torch.tensor(sorted(kept + rng.sample(rest, n_new - keep_n)), dtype=torch.long)


@dataclass
class Candidate:
    sets: list[torch.Tensor]  # per "unit" (a layer's groups, a layer's channels, ...) the kept indices
    fitness: float | None = None

    def key(self) -> tuple:
        return tuple(tuple(s.tolist()) for s in self.sets)


def evolve(fitness: Callable[[list[torch.Tensor]], float], start: list[torch.Tensor], sizes: list[int],
           ratios: list[list[int]], cost: Callable[[list[int]], float], budget: float, *,
           generations: int = 10, population: int = 20, parents: int = 5, mutations: int = 10,
           crossovers: int = 5, p_mutate: float = 0.3, alpha: float = 0.8, seed: int = 0,
           on_generation: Callable[[int, Candidate], None] | None = None) -> Candidate:
    """Minimise `fitness(sets)` over per-unit kept sets with cost(counts) ≤ budget.

    `start`: the initial sets (one per unit, within budget); `sizes[u]`: how many structures unit u has;
    `ratios[u]`: the allowed kept counts of unit u (the search grid); `cost(counts)`: e.g. parameters kept.
    """
    rng = random.Random(seed)
    seen: dict[tuple, float] = {}

    def score(c: Candidate) -> Candidate:
        k = c.key()
        if k not in seen:
            seen[k] = float(fitness(c.sets))
        c.fitness = seen[k]
        return c

    def feasible(sets) -> bool:
        return cost([s.numel() for s in sets]) <= budget + 1e-9

    def mutate(c: Candidate) -> Candidate:
        sets = []
        for u, s in enumerate(c.sets):
            if rng.random() < p_mutate:
                n_new = rng.choice(ratios[u])
                sets.append(mask_mutation(s, n_new, sizes[u], alpha, rng))
            else:
                sets.append(s)
        return Candidate(sets)

    def cross(a: Candidate, b: Candidate) -> Candidate:
        return Candidate([x if rng.random() < 0.5 else y for x, y in zip(a.sets, b.sets)])

    pop = [score(Candidate(list(start)))]
    tries = 0
    while len(pop) < population and tries < 50 * population:  # the first population: mutants of the start
        tries += 1
        c = mutate(pop[0])
        if feasible(c.sets):
            pop.append(score(c))
    best = min(pop, key=lambda c: c.fitness)
    for gen in range(generations):
        top = sorted(pop, key=lambda c: c.fitness)[:parents]
        children, tries = [], 0
        while len(children) < mutations + crossovers and tries < 50 * (mutations + crossovers):
            tries += 1
            c = mutate(rng.choice(top)) if len(children) < mutations else cross(rng.choice(top), rng.choice(top))
            if feasible(c.sets):
                children.append(score(c))
        pop = top + children
        best = min([best] + pop, key=lambda c: c.fitness)
        if on_generation is not None:
            on_generation(gen, best)
    return best


# ---- on a decoder: units are each layer's KV groups and each layer's MLP channels


def search_masks(model, S, windows: torch.Tensor, keep: float, moments, *, generations: int = 8,
                 population: int = 16, parents: int = 5, mutations: int = 8, crossovers: int = 4,
                 alpha: float = 0.8, seed: int = 0, progress=None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(group mask, channel mask, record) of the best candidate within the parameter budget that a uniform
    `keep` of both kinds leaves. Fitness: the masked model's cross-entropy on `windows` (fixed)."""
    import time

    from lowbit.prune.pg import batch_loss
    from lowbit.prune.policy import hard_mask
    from lowbit.prune.structured import masked, scores

    L = len(S.blocks)
    per_group, per_channel = S.group_params, S.channel_params
    unit_cost = [per_group] * L + [per_channel] * L

    def cost(counts: list[int]) -> float:
        return sum(c * u for c, u in zip(counts, unit_cost))

    budget = keep * (S.n_groups * per_group + S.n_all_channels * per_channel)
    gs, cs = scores(S, "activation", moments)
    from lowbit.prune.slicing import at_least_one

    g0 = at_least_one(hard_mask(gs, keep), gs, S.n_kv).view(L, S.n_kv)
    c_keep = int(round(keep * S.n_channels))
    start = ([torch.nonzero(g0[i]).flatten() for i in range(L)]
             + [torch.sort(torch.argsort(-cs.view(L, -1)[i], stable=True)[:c_keep]).values for i in range(L)])
    lo = max(0.1, keep - 0.4)
    ch_grid = sorted({int(round(f * S.n_channels)) for f in torch.arange(lo, 1.0 + 1e-9, 0.05).tolist()})
    ratios = [list(range(1, S.n_kv + 1))] * L + [ch_grid] * L  # ≥ 1 group: see prune.slicing
    sizes = [S.n_kv] * L + [S.n_channels] * L

    def to_masks(sets):
        g = torch.zeros(L, S.n_kv, dtype=torch.bool)
        c = torch.zeros(L, S.n_channels, dtype=torch.bool)
        for i in range(L):
            g[i, sets[i]] = True
            c[i, sets[L + i]] = True
        return g.reshape(-1), c.reshape(-1)

    evals = [0]

    def fitness(sets) -> float:
        evals[0] += 1
        g, c = to_masks(sets)
        with masked(model, S, g.float(), c.float()):
            return sum(batch_loss(model, windows[i:i + 4]) for i in range(0, windows.shape[0], 4))

    model.eval()
    t0 = time.perf_counter()
    history = []

    def on_gen(gen, best):
        history.append({"generation": gen, "best_fitness": best.fitness, "evaluations": evals[0]})
        if progress is not None:
            progress(gen, history[-1])

    best = evolve(fitness, start, sizes, ratios, cost, budget, generations=generations, population=population,
                  parents=parents, mutations=mutations, crossovers=crossovers, alpha=alpha, seed=seed,
                  on_generation=on_gen)
    g, c = to_masks(best.sets)
    start_fit = fitness(start)
    return g, c, {"generations": generations, "evaluations": evals[0], "seconds": time.perf_counter() - t0,
                  "start_fitness": start_fit, "best_fitness": best.fitness, "history": history,
                  "groups_per_layer": g.view(L, -1).sum(1).tolist(), "channels_per_layer": c.view(L, -1).sum(1).tolist()}
