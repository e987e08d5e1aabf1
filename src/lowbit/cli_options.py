"""Click/typer parsing helpers for the `lowbit` commands (typer-only, cheap to import).

Click options take one value per occurrence; `--recipes a.yaml b.yaml` (several values after one flag,
the form users type) needs a list option that also takes the following words up to the next option.
`GreedyListCommand` does that for the options named in `greedy` (declared as typer `List[...]` options,
so `--recipes a.yaml --recipes b.yaml` works too), and keeps the raw arguments for reports.
"""

from __future__ import annotations

import shlex
from typing import Callable

import yaml

from lowbit.errors import LowbitError

from typer.core import TyperCommand


class GreedyListCommand(TyperCommand):
    greedy = ("--recipes", "--budgets")

    def parse_args(self, ctx, args):
        ctx.meta["lowbit.raw_args"] = list(args)
        return super().parse_args(ctx, args)

    def make_parser(self, ctx):
        parser = super().make_parser(ctx)
        long_opts = getattr(parser, "_long_opt", {})  # click internals; without them: one value per flag
        for name in self.greedy:
            opt = long_opts.get(name)
            if opt is None:
                continue

            def process(value, state, _process=opt.process):
                _process(value, state)
                while state.rargs and not state.rargs[0].startswith("-"):
                    _process(state.rargs.pop(0), state)

            opt.process = process
        return parser


class MethodsHelp(TyperCommand):
    """`--help` whose `--method` line lists the registered methods. The registry imports torch (seconds), so
    it is read only when the help is shown: `{methods}` in the option's help becomes the names."""

    registry = "lowbit.methods:method_names"

    def format_help(self, ctx, formatter):
        import importlib

        module, fn = self.registry.split(":")
        names = list(getattr(importlib.import_module(module), fn)())
        for p in self.params:
            if p.name == "method" and p.help and "{methods}" in p.help:
                p.help = p.help.replace("{methods}", " | ".join(names))
        return super().format_help(ctx, formatter)


class FinetuneMethodsHelp(MethodsHelp):
    registry = "lowbit.qat.config:method_names"


def command_line(ctx) -> str:
    """`lowbit <command> <args as given>` of the running command."""
    raw = ctx.meta.get("lowbit.raw_args")
    return "lowbit " + shlex.join([ctx.info_name or "", *(raw or [])]).strip()


def assign(d: dict, assignments: list[str], on_switch: dict[tuple, Callable[[dict, object], dict]] | None = None) -> dict:
    """`--set KEY=VALUE` on a nested settings dict (changed in place and returned). KEY is a dotted path
    (`quant.kmeans.max_iter`); VALUE a YAML scalar or flow collection (`0.05`, `true`, `null`, `[1, 2]`).
    `on_switch[path]` (a path of two or more parts ending in a discriminator such as `quant.method`): applied
    first, it rebuilds the enclosing group for the new value (a new method keeps only what applies to it)."""
    on_switch = on_switch or {}
    parsed = []
    for a in assignments:
        key, eq, raw = a.partition("=")
        path = tuple(key.strip().split("."))
        if not eq or not all(path):
            raise LowbitError(f"--set {a!r}: expected KEY=VALUE with a dotted KEY, e.g. quant.damp_percent=0.05")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise LowbitError(f"--set {a!r}: the value is not valid YAML ({str(e).splitlines()[0]})") from None
        parsed.append((a, path, value))
    for a, path, value in sorted(parsed, key=lambda p: p[1] not in on_switch):  # switches first
        node = d
        for part in path[:-1]:
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise LowbitError(f"--set {a!r}: {part} is not a group of settings")
            node = node[part]
        if path in on_switch and node.get(path[-1]) != value:  # rebuild the enclosing group for the new value
            parent = d
            for part in path[:-2]:
                parent = parent[part]
            node = parent[path[-2]] = on_switch[path](node, value)
        node[path[-1]] = value
    return d
