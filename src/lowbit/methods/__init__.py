"""The method registry: one entry point from (W, stats, config) to a `QuantizedWeight`.

The pipeline, the recipes and the CLI only talk to methods through here, so adding a method means adding
its config to `MethodConfigField` and one line to `_METHODS`.
"""

from __future__ import annotations

from typing import Annotated, Callable

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

__all__ = ["AQLMConfig", "AWQConfig", "LRQConfig", "ClaqConfig", "GPTQConfig", "HQQConfig", "QuantEaseConfig", "SqueezeLLMConfig", "LayerStats", "MethodConfig", "MethodConfigField", "RTNConfig", "StatsAccumulator",
           "needs_activation_stats", "needs_calibration", "parse_method_config", "quantize_weight"]

MethodConfigField = Annotated[RTNConfig | GPTQConfig | ClaqConfig | SqueezeLLMConfig | HQQConfig | AWQConfig | QuantEaseConfig
                              | AQLMConfig | LRQConfig,
                              Field(discriminator="method")]
_ADAPTER: TypeAdapter = TypeAdapter(MethodConfigField)

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


# method name -> (implementation, needs calibration statistics: a bool, or a function of the config)
_METHODS: dict[str, tuple[Callable[..., Result], bool | Callable[..., bool]]] = {
    "rtn": (_rtn, False),
    "gptq": (_gptq, True),
    "claq": (_claq, True),
    "squeezellm": (_squeezellm, lambda c: c.weighting != "none"),  # unweighted k-means needs no data
    "hqq": (_hqq, False),
    "awq": (_awq, True),
    "quantease": (_quantease, True),
    "aqlm": (_aqlm, True),
    "lrq": (_lrq, True),
}


def _entry(config: MethodConfig) -> tuple[Callable[..., Result], bool]:
    try:
        fn, needs = _METHODS[config.method]
    except (KeyError, AttributeError):
        raise LowbitError(f"unknown quantization method {getattr(config, 'method', config)!r}; "
                          f"choose one of {sorted(_METHODS)}") from None
    return fn, bool(needs(config) if callable(needs) else needs)


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
    if isinstance(d, (RTNConfig, GPTQConfig, ClaqConfig, SqueezeLLMConfig, HQQConfig, AWQConfig, QuantEaseConfig,
                      AQLMConfig, LRQConfig)):
        return d
    try:
        return _ADAPTER.validate_python(d)
    except ValidationError as e:
        raise config_error("quantization config", e) from None
