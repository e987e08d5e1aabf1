"""Fast CPU kernels for quantized linear layers (`cpu`: int4/int8 weight-only, `lut`: codebooks), chosen per
layer by `dispatch`; `QuantizedWeight.dequantize()` is the reference they are tested against."""
