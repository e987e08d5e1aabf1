"""The one optimisation loop of lowbit: `lowbit finetune` (every QAT method, data-parallel or not), the
recipe's `finetune` stage (codebook tuning, L4Q, quantized SpIEL, LoQT on a PTQ grid) and the block-wise
reconstruction of LRQ and AQLM's fine-tuning all step through `run_steps`.

One step: set the learning rates (base rate × the schedule's factor), run this process's forward and
backward passes, sum the loss over the processes, then either the method's own update (LoQT's merge, a
SpIEL reselection: `StepSchedule`) or the optimizer's (gradients summed over the processes and clipped
first), zero the gradients, and let the caller record, evaluate or checkpoint.
"""

from __future__ import annotations

from typing import Callable

import torch

from lowbit.qat import distributed as dd


class StepSchedule:
    """What a method does around the shared optimizer step; the default does nothing. A method with state
    that changes on a schedule (LoQT's merges, SpIEL's reselections) subclasses it in its own file."""

    def begin(self, step: int) -> bool:
        """Before the step's forward passes; True: this step's gradients are the method's, not the optimizer's."""
        return False

    def take_step(self, step: int, opt: torch.optim.Optimizer) -> None:
        """Instead of the optimizer's step when `begin` returned True."""

    def end(self, step: int, opt: torch.optim.Optimizer) -> None:
        """After the step (and its zero_grad)."""


def run_steps(opt: torch.optim.Optimizer, steps: int, *, backward: Callable[[int], float],
              lr_factor: Callable[[int], float], start: int = 0, schedule: StepSchedule | None = None,
              world: dd.World | None = None, grad_clip: float | None = None,
              after: Callable[[int, float, float], None] | None = None) -> None:
    """Steps `start` … `steps`−1. `backward(step)` runs this process's forward and backward passes and
    returns its loss (already divided as the caller's objective wants); `after(step, loss, lr_factor)` runs
    once the step is done, with the loss summed over the processes."""
    schedule = schedule or StepSchedule()
    world = world or dd.World()
    params = [p for g in opt.param_groups for p in g["params"]]
    base_lrs = [g["lr"] for g in opt.param_groups]
    for step in range(start, steps):
        f = lr_factor(step)
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * f
        own = schedule.begin(step)
        loss = dd.all_reduce_sum(backward(step), world)
        if own:
            schedule.take_step(step, opt)
        else:
            dd.all_reduce_grads(params, world)
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
        opt.zero_grad(set_to_none=True)
        schedule.end(step, opt)
        if after is not None:
            after(step, loss, f)
