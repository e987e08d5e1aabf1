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


@pytest.mark.parametrize("command", ["quantize", "eval", "compare", "finetune", "generate"])
def test_every_heavy_command_takes_a_device(command):
    from typer.testing import CliRunner

    from lowbit.cli import app

    out = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert out.exit_code == 0 and "--device" in out.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_device_without_cuda_is_a_clear_error(tmp_path):
    from lowbit.inference.generate import load_for_inference
    from lowbit.qat.config import parse_qat_config, parse_train_config
    from lowbit.qat.trainer import train

    with pytest.raises(LowbitError, match="CUDA is not available"):
        train(str(tmp_path), tmp_path / "out", parse_qat_config({"method": "l4q"}), parse_train_config({}),
              device="cuda")
    with pytest.raises(LowbitError, match="CUDA is not available"):
        load_for_inference(tmp_path, device="cuda:0")


def test_generate_samples_the_same_from_host_logits():
    """Sampling draws from the host generator on host logits, so a GPU run samples what a CPU run does."""
    from lowbit.inference.generate import _next_token

    logits = torch.randn(1, 50)
    a = _next_token(logits, 0.8, 10, torch.Generator().manual_seed(3))
    assert a.device.type == "cpu" and a.shape == (1, 1)
    assert _next_token(logits, 0.0, 0, torch.Generator()).item() == int(logits.argmax())
    assert a.item() == _next_token(logits, 0.8, 10, torch.Generator().manual_seed(3)).item()
