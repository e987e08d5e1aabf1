"""Click/typer parsing helpers for the `lowbit` commands (typer-only, cheap to import).

Click options take one value per occurrence; `--recipes a.yaml b.yaml` (several values after one flag,
the form users type) needs a list option that also takes the following words up to the next option.
`GreedyListCommand` does that for the options named in `greedy` (declared as typer `List[...]` options,
so `--recipes a.yaml --recipes b.yaml` works too), and keeps the raw arguments for reports.
"""

from __future__ import annotations

import shlex

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


def command_line(ctx) -> str:
    """`lowbit <command> <args as given>` of the running command."""
    raw = ctx.meta.get("lowbit.raw_args")
    return "lowbit " + shlex.join([ctx.info_name or "", *(raw or [])]).strip()
