"""The demo table on the reference model, written to bench/results/quality.{md,json}.

    python bench/quality.py [--max-windows N]

Same runs and protocol as `make demo` (RTN and GPTQ, 4 and 3 bits, group 128, WikiText-2 test perplexity,
KL to the fp32 model, quantization seconds and peak memory per run).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lowbit.demo import run_demo

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--kl-windows", type=int, default=128)
    ap.add_argument("--data", default=None)
    a = ap.parse_args()
    run_demo(Path(__file__).parent / "results", data=a.data, max_windows=a.max_windows,
             kl_windows=a.kl_windows, stem="quality")
