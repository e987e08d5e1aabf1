"""What lowbit can do, read from the registries: `lowbit methods`, docs/methods.md and the recipe schema.

The post-training methods come from `lowbit.methods.METHODS`, the fine-tuning methods from
`lowbit.qat.config.CONFIGS`; nothing here lists a method by hand, so a registered method is documented
the moment it exists.
"""

from __future__ import annotations

import json

from pydantic import BaseModel

from lowbit.methods import METHODS
from lowbit.methods.config import WeightQuantConfig
from lowbit.qat.config import CONFIGS as QAT_CONFIGS

# Settings every weight quantizer shares: listed once in the header, not in every row.
SHARED = tuple(WeightQuantConfig.model_fields)


def _summary(cls: type) -> str:
    return " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())


def _default(field) -> str:
    if field.default_factory is not None:
        return "{…}"
    return json.dumps(field.default) if not isinstance(field.default, BaseModel) else "{…}"


def settings(cls: type[BaseModel], skip: tuple[str, ...] = ()) -> str:
    """`name=default` for each setting of a config class, the shared ones and `method` left out."""
    return ", ".join(f"{k}={_default(f)}" for k, f in cls.model_fields.items() if k != "method" and k not in skip)


def rows() -> list[dict]:
    out = []
    for m in METHODS:
        needs = m.needs_calibration
        out.append({"command": "quantize", "method": m.name, "kind": m.kind,
                    "data": "depends" if callable(needs) else ("yes" if needs else "no"),
                    "summary": _summary(m.config), "settings": settings(m.config, SHARED)})
    for c in QAT_CONFIGS:
        out.append({"command": "finetune", "method": c.model_fields["method"].default, "kind": "training",
                    "data": "yes", "summary": _summary(c), "settings": settings(c)})
    return out


def markdown() -> str:
    """docs/methods.md, generated (`lowbit methods --markdown > docs/methods.md`; a test keeps it current)."""
    lines = ["# Methods", "",
             "Generated from lowbit's registries by `lowbit methods --markdown`; do not edit by hand.", "",
             "Every `lowbit quantize` method also takes the shared weight-quantizer settings "
             f"({', '.join(f'`{k}`' for k in SHARED)}); a recipe sets them under `quant:` (`lowbit methods "
             "--schema` prints the recipe's JSON schema).", ""]
    for command, title in (("quantize", "Post-training (`lowbit quantize --method`, recipe `quant.method`)"),
                           ("finetune", "Fine-tuning (`lowbit finetune --method`, recipe `finetune`)")):
        lines += [f"## {title}", "", "| method | kind | calibration data | what it is | settings (defaults) |",
                  "|---|---|---|---|---|"]
        for r in rows():
            if r["command"] == command:
                cells = [f"`{r['method']}`", r["kind"], r["data"], r["summary"], f"`{r['settings']}`" if r["settings"] else ""]
                lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def recipe_schema() -> dict:
    from lowbit.recipe import Recipe

    return Recipe.model_json_schema()
