"""`--device`: resolution and errors, and the device plumbing run on the CPU (the CUDA path is checked by
bench/gpu_smoke.py where there is a GPU)."""

from __future__ import annotations

import pytest
import torch

from lowbit.devices import resolve_device
from lowbit.errors import LowbitError
from lowbit.methods import GPTQConfig
from lowbit.nn.quant_linear import QuantLinear
from lowbit.pipeline.calibrate import quantize_model

from test_architectures import build, windows


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(LowbitError, match="must be auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(LowbitError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_explicit_cpu_device_changes_nothing():
    a = quantize_model(build("llama"), GPTQConfig(bits=3, group_size=32), windows(), progress=False)
    b = quantize_model(build("llama"), GPTQConfig(bits=3, group_size=32), windows(), progress=False, device="cpu")
    assert all(torch.equal(a.qweights[k].codes, b.qweights[k].codes) for k in a.qweights)


def test_quant_linear_moves_with_its_module_and_keeps_its_types():
    res = quantize_model(build("llama"), GPTQConfig(bits=4, group_size=32), windows(), progress=False)
    q = next(iter(res.qweights.values()))
    assert q.to("cpu") is q and q.device == torch.device("cpu")
    layer = QuantLinear(q)
    x = torch.randn(3, q.shape[1])
    y = layer(x)
    layer.to(torch.bfloat16)  # a dtype change leaves the stored codes and scales alone
    assert layer.qweight is q
    layer.to("meta")  # (a released block) never touches the quantized tensors
    assert layer.qweight is q
    torch.testing.assert_close(QuantLinear(q)(x), y)
