"""Run one decoder block over every calibration batch, computing each sub-module as few times as possible.

True-sequential quantization (GPTQ's recipe) runs the block once per group of linears — {q, k, v}, o,
{gate, up}, down — so that each group's statistics come from a block whose earlier groups are already
quantized, then once more to produce the next block's inputs. Done naively, the attention is computed
five times and the MLP up-projections three times per block. Three facts avoid that without changing a
single value that the statistics or the outputs see:

1. **A pass stops as soon as the statistics are in.** Each group layer gets a forward *pre*-hook that
   feeds its input to the accumulator; when every layer of the group has been fed, the pass raises and
   the rest of the block is skipped, including the group layers' own products. Layers fed the very same
   input tensor (q/k/v, gate/up) share one accumulator, and after the first batch the pass stops at the
   first of them.
2. **Frozen outputs are reused.** A sub-module none of whose linears is still to be quantized computes
   the same output on the same batch in every later pass, provided no pending layer ran before it in
   that pass (its inputs then come from the block input and frozen modules only). Such an output is
   stored when first computed and returned from then on (the module's forward is not called).
3. **Pass-through modules are one product.** When a module's output *is* the output tensor of its last
   linear L (self_attn returns o_proj's output, the MLP returns down_proj's, checked by object identity
   the first time the module runs whole), and L's inputs were kept when L's statistics were collected,
   the module's output on every other batch is L(kept input): the attention is not recomputed.

Stored outputs and kept inputs share a memory budget; anything over it is simply recomputed. On a
LLaMA block this makes calibration cost about one forward pass plus the statistics, instead of about
3.4 forward passes (bench/results/calib-speed.json).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lowbit.methods.stats import StatsAccumulator
from lowbit.models.adapters import is_quantizable


class _Caught(Exception):
    """Raised by a pre-hook to stop a forward pass once the statistics it needs are in."""


def _bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(map(_bytes, obj))
    if isinstance(obj, dict):
        return sum(map(_bytes, obj.values()))
    return 0


def run_block(block: nn.Module, hidden: torch.Tensor, ctx: tuple[tuple, dict]) -> Any:
    args, kwargs = ctx
    out = block(hidden, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


class BlockRunner:
    """One block, its calibration batches (`hidden`, `ctxs`), stored outputs and kept layer inputs.

    `pending` holds the full names of the block's layers not quantized yet; `done()` removes them as the
    pipeline quantizes them. A module is *frozen* when it holds a quantizable layer and no pending one.
    """

    def __init__(self, model: nn.Module, block: nn.Module, prefix: str, hidden: list, ctxs: list,
                 pending: set[str], budget_bytes: int):
        self.model, self.block = model, block
        self.hidden, self.ctxs = hidden, ctxs
        self._rel = (lambda n: n[len(prefix) + 1:]) if prefix else (lambda n: n)
        self.pending = {self._rel(n) for n in pending}
        self.budget, self.used = budget_bytes, 0
        self.stored: dict[str, dict[int, Any]] = {}  # module → {batch: output}
        self.inputs: dict[str, dict[int, torch.Tensor]] = {}  # layer → {batch: input}
        self.passthrough: dict[str, tuple[str, int]] = {}  # module → (its last layer, tuple length or 0)
        self.checked: set[str] = set()  # modules whose pass-through test has run
        self._tainted = False

    # -- bookkeeping

    def done(self, names: list[str]) -> None:
        """These layers are quantized now (their modules swapped in): their parents may freeze."""
        self.pending.difference_update(self._rel(n) for n in names)

    def _frozen(self, name: str, m: nn.Module) -> bool:
        from lowbit.nn.quant_linear import QuantLinear

        holds = any(is_quantizable(c) or isinstance(c, QuantLinear) for c in m.modules())
        return holds and not any(p == name or p.startswith(name + ".") for p in self.pending)

    def _fits(self, size: int) -> bool:
        return self.used + size <= self.budget

    def _drop_below(self, name: str, b: int) -> None:
        """Stored outputs and kept inputs inside `name` are covered by its own stored output now."""
        for table in (self.stored, self.inputs):
            for other in [o for o in table if o.startswith(name + ".")]:
                self.used -= _bytes(table[other].pop(b, None))

    def _store(self, name: str, b: int, y: Any) -> None:
        if self._tainted or not self._fits(_bytes(y)):
            return
        self._drop_below(name, b)
        self.stored.setdefault(name, {})[b] = y
        self.used += _bytes(y)

    def _keep_input(self, layer: str, b: int, x: torch.Tensor) -> None:
        """Keep a single-layer group's input when a sub-module (not the block) holds the layer: that module
        may turn out to pass its output through (fact 3)."""
        if "." in layer and not self._tainted and self._fits(_bytes(x)):
            self.inputs.setdefault(layer, {})[b] = x
            self.used += _bytes(x)

    # -- one pass

    def _through(self, name: str, b: int):
        """forward of a pass-through module on batch b: its last layer on the kept input."""
        layer, arity = self.passthrough[name]
        x = self.inputs[layer][b]

        def forward(*a, **k):
            y = self.block.get_submodule(layer)(x)
            return (y, *[None] * (arity - 1)) if arity else y

        return forward

    def _recording(self, name: str, m: nn.Module, b: int):
        """forward that records the output; the first time, also tests the pass-through identity."""
        real = m.forward
        candidates = [n for n in self.inputs if n.startswith(name + ".") and b in self.inputs[n]]
        if name in self.checked or not candidates:
            def forward(*a, **k):
                y = real(*a, **k)
                self._store(name, b, y)
                return y
            return forward

        def forward(*a, **k):
            seen = {}
            hooks = [self.block.get_submodule(n).register_forward_hook(
                lambda mod, i, o, _n=n: seen.__setitem__(_n, o)) for n in candidates]
            try:
                y = real(*a, **k)
            finally:
                for h in hooks:
                    h.remove()
            self.checked.add(name)
            # (L's output) or (L's output, None, ...): anything else in a tuple would be stale on reuse
            first = y[0] if isinstance(y, tuple) and all(e is None for e in y[1:]) else y
            for n, out in seen.items():
                if out is first:
                    self.passthrough[name] = (n, len(y) if isinstance(y, tuple) else 0)
            self._store(name, b, y)
            return y
        return forward

    def _install(self, b: int) -> list[nn.Module]:
        """Route frozen modules (top-down) to a stored output, a pass-through product, or a recording."""
        replaced, recording, mods = [], [], []
        for name, m in self.block.named_modules():
            if not name or any(name.startswith(r + ".") for r in replaced) or not self._frozen(name, m):
                continue
            if b in self.stored.get(name, {}):
                m.forward = lambda *a, _y=self.stored[name][b], **k: _y
                replaced.append(name)
            elif name in self.passthrough and b in self.inputs.get(self.passthrough[name][0], {}):
                def forward(*a, _f=self._through(name, b), _n=name, **k):
                    y = _f()
                    self._store(_n, b, y)
                    return y

                m.forward = forward
                replaced.append(name)
            elif not any(name.startswith(r + ".") for r in recording):
                m.forward = self._recording(name, m, b)
                recording.append(name)
            else:
                continue
            mods.append(m)
        return mods

    def run(self, b: int, prehooks: list[tuple[nn.Module, Callable]] | None = None) -> Any:
        """Run batch b through the block; None when a pre-hook stopped it early."""
        mods = self._install(b)
        self._tainted = False

        def taint(module, args, kwargs):
            self._tainted = True

        pending = [self.block.get_submodule(p) for p in self.pending]
        handles = [m.register_forward_pre_hook(fn, with_kwargs=True) for m, fn in (prehooks or [])]
        handles += [m.register_forward_pre_hook(taint, with_kwargs=True) for m in pending]  # after: stats first
        try:
            return run_block(self.block, self.hidden[b], self.ctxs[b])
        except _Caught:
            return None
        finally:
            for h in handles:
                h.remove()
            for m in mods:
                del m.forward  # back to the class's forward

    # -- the two uses

    def collect(self, group: list[str], hessian: bool = True, activations: bool = True,
                buffers: dict[str, list[torch.Tensor]] | None = None) -> dict[str, StatsAccumulator]:
        """Statistics of every layer of `group` over every batch. Layers fed the same input tensor share
        one accumulator object; once batch 0 shows that the whole group is fed one tensor, each later
        pass stops at the first of them. `activations`: also mean|x| statistics (AWQ, LQER).
        `buffers` (data-parallel calibration): each layer's inputs are kept there, batch by batch, instead
        of being added (twins share one copy), and no accumulator is returned."""
        from lowbit.models.adapters import layer_weight

        accs: dict[str, StatsAccumulator] = {}
        shared = False
        for b in range(len(self.hidden)):
            seen: dict[str, torch.Tensor] = {}

            def hook(module, args, kwargs, name):
                x = args[0] if args else next(iter(kwargs.values()))  # identity matters: no .detach() copy
                twin = next((n for n, t in seen.items() if t is x), None)
                if buffers is not None:  # (a pass that stops at the first layer of a shared group feeds all)
                    kept = buffers[twin][-1] if twin is not None else x.detach().clone()
                    for n in (group if shared else [name]):
                        buffers.setdefault(n, []).append(kept)
                elif twin is not None:
                    accs.setdefault(name, accs[twin])
                else:
                    accs.setdefault(name, StatsAccumulator(x.shape[-1], hessian=hessian, activations=activations,
                                                           device=x.device)).add(x.detach())
                seen[name] = x
                if len(group) == 1:
                    self._keep_input(self._rel(name), b, x.detach())
                if shared or len(seen) == len(group):
                    raise _Caught

            self.run(b, [(self.model.get_submodule(n), lambda m, a, k, _n=n: hook(m, a, k, _n)) for n in group])
            if b == 0:
                shared = len(seen) == len(group) and all(t is next(iter(seen.values())) for t in seen.values())
        if buffers is not None:
            return {}
        for n in group:  # a layer the forward never reached: no samples (the caller decides)
            accs.setdefault(n, StatsAccumulator(layer_weight(self.model.get_submodule(n)).shape[1], hessian=hessian,
                                                activations=activations))
        return accs

    def outputs(self):
        """The block's outputs batch after batch (all its layers quantized), reusing what was kept. Lazy:
        the caller may overwrite batch b's input with its output before batch b + 1 is run."""
        return (self.run(b) for b in range(len(self.hidden)))
