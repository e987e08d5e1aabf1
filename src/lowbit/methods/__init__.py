"""The method registry: one entry point from (W, stats, config) to a `QuantizedWeight`.

Every post-training method is declared once, in `METHODS` below: its config class (whose `method` literal
is its name and whose docstring's first paragraph is its summary), its quantizer and whether it needs
calibration statistics. The recipe schema (`MethodConfigField`), `parse_method_config`, the `--method`
help of `lowbit quantize`, `lowbit methods` and docs/methods.md are all generated from it: adding a method
means its own file, its config class and one line here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Callable, Union

import torch
from pydantic import Field, TypeAdapter, ValidationError

from lowbit.errors import LowbitError, config_error
from lowbit.formats.quantized_weight import QuantizedWeight
from lowbit.methods.claq import claq_quantize
from lowbit.methods.awq import awq_quantize
from lowbit.methods.aqlm import aqlm_quantize
from lowbit.methods.config import (AQLMConfig, AWQConfig, ClaqConfig, GPTQConfig, HQQConfig, LRQConfig, MethodConfig,
                                   QuantEaseConfig, RTNConfig, SqueezeLLMConfig)
from lowbit.methods.gptq import gptq_quantize
from lowbit.methods.hqq import hqq_quantize
from lowbit.methods.lqer import lqer
from lowbit.methods.quantease import quantease_quantize
from lowbit.methods.rtn import rtn_quantize
from lowbit.methods.squeezellm import squeezellm_quantize
from lowbit.methods.stats import LayerStats, StatsAccumulator

__all__ = ["AQLMConfig", "AWQConfig", "LRQConfig", "ClaqConfig", "GPTQConfig", "HQQConfig", "QuantEaseConfig",
           "SqueezeLLMConfig", "LayerStats", "METHODS", "Method", "MethodConfig", "MethodConfigField", "RTNConfig",
           "StatsAccumulator", "method_names", "needs_activation_stats", "needs_calibration", "parse_method_config",
           "quantize_weight"]

Result = tuple[QuantizedWeight, float | None]


def _rtn(W: torch.Tensor, stats: LayerStats | None, config: RTNConfig) -> Result:
    return rtn_quantize(W, config), None


def _gptq(W: torch.Tensor, stats: LayerStats | None, config: GPTQConfig) -> Result:
    H = None if stats is None else stats.hessian
    return gptq_quantize(W, H, config, return_loss=True)


def _claq(W: torch.Tensor, stats: LayerStats | None, config: ClaqConfig) -> Result:
    return claq_quantize(W, None if stats is None else stats.hessian, config, return_loss=True)


def _squeezellm(W: torch.Tensor, stats: LayerStats | None, config: SqueezeLLMConfig) -> Result:
    return squeezellm_quantize(W, None if stats is None else stats.hessian, config), None


def _hqq(W: torch.Tensor, stats: LayerStats | None, config: HQQConfig) -> Result:
    return hqq_quantize(W, config), None


def _quantease(W: torch.Tensor, stats: LayerStats | None, config: QuantEaseConfig) -> Result:
    return quantease_quantize(W, None if stats is None else stats.hessian, config, return_loss=True)


def _aqlm(W: torch.Tensor, stats: LayerStats | None, config: AQLMConfig) -> Result:
    return aqlm_quantize(W, None if stats is None else stats.hessian, config, return_loss=True)


def _lrq(W: torch.Tensor, stats: LayerStats | None, config: LRQConfig) -> Result:
    raise LowbitError("lrq learns a whole decoder block against the float block's outputs: it runs through "
                      "quantize_model (lowbit quantize), not layer by layer")


def _awq(W: torch.Tensor, stats: LayerStats | None, config: AWQConfig) -> Result:
    return awq_quantize(W, stats, config, return_loss=True)


@dataclass(frozen=True)
class Method:
    config: type  # its pydantic config class; `config.model_fields["method"].default` is the name
    quantize: Callable[..., Result]  # (W, stats, config) -> (QuantizedWeight, the method's loss or None)
    needs_calibration: bool | Callable[..., bool]  # a bool, or a function of the config
    kind: str  # "uniform" grid | "codebook" | "vector" | "reconstruction" (how `lowbit methods` groups them)

    @property
    def name(self) -> str:
        return self.config.model_fields["method"].default


METHODS: tuple[Method, ...] = (
    Method(RTNConfig, _rtn, False, "uniform"),
    Method(GPTQConfig, _gptq, True, "uniform"),
    Method(AWQConfig, _awq, True, "uniform"),
    Method(HQQConfig, _hqq, False, "uniform"),
    Method(QuantEaseConfig, _quantease, True, "uniform"),
    Method(ClaqConfig, _claq, True, "codebook"),
    Method(SqueezeLLMConfig, _squeezellm, lambda c: c.weighting != "none", "codebook"),  # unweighted: no data
    Method(AQLMConfig, _aqlm, True, "vector"),
    Method(LRQConfig, _lrq, True, "reconstruction"),
)
_BY_NAME = {m.name: m for m in METHODS}
_CONFIGS = tuple(m.config for m in METHODS)

# The recipe's `quant:` field: one of the registered configs, chosen by its `method` key.
MethodConfigField = Annotated[Union[_CONFIGS], Field(discriminator="method")]
_ADAPTER: TypeAdapter = TypeAdapter(MethodConfigField)


def method_names() -> list[str]:
    return list(_BY_NAME)


def switch_method(settings: dict, method: str) -> dict:
    """What a config dict `settings` keeps when its method becomes `method`: the shared bits and symmetry,
    and its group size unless that is the old method's default (a default the user never chose gives way
    to the new method's own, e.g. CLAQ's codebook per column)."""
    old = _BY_NAME.get(settings.get("method"))
    kept = {k: settings[k] for k in ("bits", "symmetric") if k in settings}
    if "group_size" in settings and (old is None or settings["group_size"] != old.config.model_fields["group_size"].default):
        kept["group_size"] = settings["group_size"]
    return {**kept, "method": method}


def _entry(config: MethodConfig) -> tuple[Callable[..., Result], bool]:
    m = _BY_NAME.get(getattr(config, "method", None))
    if m is None:
        raise LowbitError(f"unknown quantization method {getattr(config, 'method', config)!r}; "
                          f"choose one of {method_names()}")
    needs = m.needs_calibration
    return m.quantize, bool(needs(config) if callable(needs) else needs)


def needs_calibration(config: MethodConfig) -> bool:
    """True when the method (or its low-rank step's activation scale) needs input statistics."""
    lr = getattr(config, "lqer", None)
    return _entry(config)[1] or (lr is not None and lr.scale != "none")


def needs_activation_stats(config: MethodConfig) -> bool:
    """True when the method reads mean|x| statistics (AWQ's activation scale, L²QER's act-mean scale);
    the pipeline then accumulates them beside the Hessian."""
    lr = getattr(config, "lqer", None)
    return config.method == "awq" or (lr is not None and lr.scale == "act-mean")


def quantize_weight(W: torch.Tensor, stats: LayerStats | None, config: MethodConfig, *,
                    return_loss: bool = False):
    """Quantize one weight W [out, in]. With `return_loss`, also the method's own loss (GPTQ's Σ err²/2, else None)."""
    fn, needs = _entry(config)
    if needs and (stats is None or stats.hessian is None):
        raise LowbitError(f"{config.method} needs calibration statistics (a Hessian) for every layer")
    qw, loss = fn(W, stats, config)
    if config.lqer is not None:
        # LQER: factors of the error against the exact deployed Ŵ of the base grid.
        qw = lqer(qw, W, stats, config.lqer)
    return (qw, loss) if return_loss else qw


def parse_method_config(d: dict | MethodConfig) -> MethodConfig:
    """Build the right config from a dict with a `method` key (YAML recipes and CLI flags share this)."""
    if isinstance(d, _CONFIGS):
        return d
    try:
        return _ADAPTER.validate_python(d)
    except ValidationError as e:
        raise config_error("quantization config", e) from None
