"""The demo's machinery on the toy model: isolated `lowbit quantize` processes, one protocol, the table,
the JSON with provenance and the Pareto plot; run again, finished runs are reused."""

from __future__ import annotations

import json

import pytest

from lowbit import demo
from lowbit.eval import protocol


def test_demo_end_to_end_on_the_toy_model(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import lowbit.reference as reference

    monkeypatch.setattr(reference, "build_reference", lambda **kw: tiny_model_dir)
    tiny = protocol.Protocol(profile="quick", seqlen=64, windows=4, calib_samples=4, calib_seqlen=64)
    monkeypatch.setitem(protocol.PROFILES, "quick", tiny)
    runs = [("rtn-w4-g32", {"quant": {"method": "rtn", "bits": 4, "group_size": 32}}),
            ("gptq-w3-g48", {"quant": {"method": "gptq", "bits": 3, "group_size": 48}})]  # partial groups
    rows = demo.run_demo(tmp_path, runs=runs)
    assert [r["name"] for r in rows][0].startswith("fp32") and {r["name"] for r in rows[1:]} == {n for n, _ in runs}
    by = {r["name"]: r for r in rows}
    assert by["rtn-w4-g32"]["bits_per_weight"] == pytest.approx(4 + 20 / 32)
    assert by["gptq-w3-g48"]["peak_memory_mb"] > 0 and by["gptq-w3-g48"]["kl"] > 0
    saved = json.loads((tmp_path / "demo.json").read_text())
    assert saved["provenance"]["protocol"]["windows"] == 4 and saved["provenance"]["torch"]
    assert (tmp_path / "demo" / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| rtn-w4-g32 |" in (tmp_path / "demo.md").read_text()
    out = capsys.readouterr()
    assert "| gptq-w3-g48 |" in out.out
    # again: both runs come back from their saved results (nothing re-quantized)
    stamp = (tmp_path / "demo" / "runs" / "rtn-w4-g32.json").stat().st_mtime_ns
    demo.run_demo(tmp_path, runs=runs)
    assert (tmp_path / "demo" / "runs" / "rtn-w4-g32.json").stat().st_mtime_ns == stamp


def test_demo_recipes_are_the_bench_suite_recipes_of_the_same_name():
    """quality.json reports the demo's recipes from the full ptq suite by name: the two must not drift."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "suite.py"
    spec = importlib.util.spec_from_file_location("bench_suite", path)
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    ptq = suite.SUITES["ptq"]()
    for name, recipe in demo.RUNS:
        assert ptq[name] == recipe, name
    assert set(demo.BEST.values()) <= {n for n, _ in demo.RUNS} and set(demo.BEST) == {3, 4}
