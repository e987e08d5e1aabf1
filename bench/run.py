"""`make bench`: every bench of lowbit, one after the other, under one evaluation protocol.

    python bench/run.py [--profile quick|full] [--only NAME ...]

quick (the default; a few hours on 2 CPU cores, estimated from the runs in bench/results) and full (the
committed tables; many hours) differ in windows and calibration size only. Every result
file records its profile, protocol and provenance; `bench/summarize.py` (the last step) builds the
tables by bit width, the paper-claim lines and the README's results section from them.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def steps(profile: str) -> dict[str, list[str]]:
    quick = profile == "quick"
    py = [sys.executable]
    out = str(HERE / "results" / "quick") if quick else str(HERE / "results")  # quick never overwrites
    return {
        "suite": py + [str(HERE / "suite.py"), "--profile", profile],
        "qat": py + [str(HERE / "qat.py"), "--profile", profile, "--bits", "3",
                     *(["--steps", "20"] if quick else [])],
        "qat-memory": py + [str(HERE / "qat.py"), "--memory", "--profile", profile],
        "sparse-ft": py + [str(HERE / "sparse_ft.py"), "--profile", profile, "--steps", "30"],
        "onebit": py + [str(HERE / "onebit.py"), "--profile", profile, *(["--steps", "20"] if quick else
                                                                        ["--lr", "2e-3", "--batch-size", "2",
                                                                         "--seqlen", "128"])],
        "udfc": py + [str(HERE / "udfc.py"), "--part", "all", "--profile", profile],
        "structured-pruning": py + [str(HERE / "structured_pruning.py"), "--profile", profile, "--pg-steps", "30",
                                    "--search-generations", "3", "--search-population", "8"],
        "depth-pruning": py + [str(HERE / "structured_pruning.py"), "--profile", profile, "--pg-steps", "30",
                               "--search-generations", "3", "--search-population", "8", "--keep", "0.9", "0.8",
                               "--methods", "depth-bi", "depth", "--merge"],
        "quantease-layers": py + [str(HERE / "quantease_layers.py")],
        "calib-speed": py + [str(HERE / "calib_speed.py"), "--windows", "32" if quick else "128",
                             "--label", f"after-{profile}"],
        "hqq-layers": py + [str(HERE / "hqq_layers.py")],
        "kmeans": py + [str(HERE / "kmeans_speed.py")],
        "svd": py + [str(HERE / "lqer_svd.py"), *(["--quick"] if quick else [])],
        "speed": py + [str(HERE / "speed.py"), "--out", out, *(["--quick"] if quick else [])],
        "inference": py + [str(HERE / "inference.py"), "--out", out, *(["--quick"] if quick else [])],
        "rd": py + [str(HERE / "rd.py"), "--out", out, *(["--part", "gaussian", "--size", "1024"] if quick else [])],
        "scale": py + [str(HERE / "scale.py"), "--out", str(Path(out) / "scale.json"),
                       *(["--sizes", "0.1B", "0.5B"] if quick else [])],
        "chat-calib": py + [str(HERE / "chat_calib.py"), "--profile", profile,
                            "--out", str(Path(out) / "chat-calib.json")],
        "gguf-kquants": py + [str(HERE / "gguf_kquants.py"), "--profile", profile,
                              "--out", str(Path(out) / "gguf-kquants.json")],
        "gpu-smoke": py + [str(HERE / "gpu_smoke.py"), "--out", str(Path(out) / "gpu-smoke.json")],  # CUDA only
        "summarize": py + [str(HERE / "summarize.py"), "--profile", profile],
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="quick", choices=["quick", "full"])
    ap.add_argument("--only", nargs="+", default=None)
    a = ap.parse_args()
    todo = steps(a.profile)
    for name, cmd in todo.items():
        if a.only and name not in a.only:
            continue
        t0 = time.perf_counter()
        print(f"[bench] {name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
        if subprocess.run(cmd).returncode != 0:
            sys.exit(f"[bench] {name} failed")
        print(f"[bench] {name}: done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
