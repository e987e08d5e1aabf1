"""Put `QuantLinear`s where the quantized layers were (the pipeline and the native loader share this)."""

from __future__ import annotations

from torch import nn

from lowbit.errors import LowbitError
from lowbit.formats.quantized_weight import QuantizedWeight
from lowbit.models.adapters import is_quantizable, layer_shape
from lowbit.nn.quant_linear import QuantLinear, replace_module


def make_quant_linear(module: nn.Module, qweight: QuantizedWeight, name: str = "layer") -> QuantLinear:
    """A QuantLinear computing what `module` computed, with the weight replaced by `qweight`; keeps the bias."""
    if isinstance(module, QuantLinear):
        shape = (module.out_features, module.in_features)
    elif is_quantizable(module):
        shape = layer_shape(module)
    else:
        raise LowbitError(f"{name}: a {type(module).__name__} cannot be replaced by a quantized linear layer")
    if tuple(shape) != tuple(qweight.shape):
        raise LowbitError(f"{name}: quantized weight has shape {qweight.shape}, the layer expects {tuple(shape)}")
    bias = getattr(module, "bias", None)
    return QuantLinear(qweight, bias)


def swap_in(model: nn.Module, qweights: dict[str, QuantizedWeight]) -> nn.Module:
    """Replace each named module of `model` by a QuantLinear running its QuantizedWeight. Returns `model`."""
    for name, qw in qweights.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise LowbitError(f"{name}: no such module in {type(model).__name__}") from None
        replace_module(model, name, make_quant_linear(module, qw, name))
    return model
