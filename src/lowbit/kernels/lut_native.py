"""The native LUT matvecs (`lut_matvec.c`): built with the system C compiler on first use, cached, loaded
with ctypes. Small batches (decode) of codebook layers (CLAQ, SqueezeLLM) and of additive-code layers
(AQLM, codes ≤ 8 bits) run there, straight from the uint8 codes.

Build: `cc -O3 -march=native -fopenmp -shared` into `<lowbit cache>/kernels/`, the file name keyed by the
source, the compiler, the flags and the CPU (a cache shared between machines never loads code built for
another CPU); written under a temporary name and renamed, so concurrent first uses are safe. Without a
compiler, or when the build fails, `library()` returns None once with a warning, and the torch path
(`kernels.lut`) runs instead. LOWBIT_NO_NATIVE=1 turns the native path off.
"""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import subprocess
import warnings
from pathlib import Path

import torch

from lowbit.fingerprint import sha
from lowbit.io.atomic import atomic_write

SOURCE = Path(__file__).with_name("lut_matvec.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared"]
TAB = 16  # table entries per column / row, as the C code pads them
BLOCK = 16  # output rows per code block of the per-column kernel
_state: dict = {}


def _cpu_id() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(cc: str) -> Path:
    from lowbit.cache import cache_root

    src = SOURCE.read_bytes()
    key = sha(b"\0".join([src, cc.encode(), " ".join(FLAGS).encode(), _cpu_id().encode(),
                           platform.machine().encode()]))[:16]
    out = cache_root() / "kernels" / f"lut_matvec-{key}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: subprocess.run([cc, *FLAGS, str(SOURCE), "-o", str(tmp)], check=True,
                                                 capture_output=True, text=True, timeout=120))
    return out


def library():
    """The loaded kernel library, or None (no compiler, build failed, LOWBIT_NO_NATIVE set)."""
    if "lib" in _state:
        return _state["lib"]
    lib = None
    if os.environ.get("LOWBIT_NO_NATIVE", "") not in ("", "0"):
        _state["lib"] = None
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    try:
        if cc is None:
            raise RuntimeError("no C compiler (cc / gcc) on PATH")
        lib = ctypes.CDLL(str(_build(cc)))
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        lib.lut_col_matvec.argtypes = [p, i64, i64, p, p, i64, p, p, i32]
        lib.lut_row_matvec.argtypes = [p, i64, i64, p, p, i64, p, i32]
        lib.additive_matvec.argtypes = [p, i64, i64, i64, p, p, i64, p, i32]
        lib.lut_col_matvec.restype = lib.lut_row_matvec.restype = lib.additive_matvec.restype = None
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        warnings.warn(f"lowbit: the native LUT kernel is unavailable ({detail.strip()[:300]}); codebook layers "
                      "run on the slower torch path", RuntimeWarning, stacklevel=2)
        lib = None
    _state["lib"] = lib
    return lib


def pad_table(table: torch.Tensor) -> torch.Tensor:
    """[n, entries ≤ 16] → float32 [n, 16] (unused entries 0; codes never reach them)."""
    out = torch.zeros(table.shape[0], TAB, dtype=torch.float32)
    out[:, : table.shape[1]] = table.float()
    return out


def block_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] → [⌈N/16⌉, K, 16]: per block of 16 output rows, column-major (rows past N: code 0)."""
    n, k = codes.shape
    nb = -(-n // BLOCK)
    padded = torch.zeros(nb * BLOCK, k, dtype=torch.uint8)
    padded[:n] = codes
    return padded.reshape(nb, BLOCK, k).transpose(1, 2).contiguous()


def unblock_rows(blocked: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """Rows r0:r1 (r0 a multiple of 16) of the codes `block_codes` was given, as uint8 [r1 − r0, K]."""
    b0, b1 = r0 // BLOCK, -(-r1 // BLOCK)
    rows = blocked[b0:b1].transpose(1, 2).reshape(-1, blocked.shape[1])
    return rows[: r1 - r0]


def col_matvec(lib, x: torch.Tensor, table16: torch.Tensor, blocked: torch.Tensor, n: int) -> torch.Tensor:
    """x [M, K] float32 contiguous → x·Ŵᵀ [M, n], ŵ[r, c] = table16[c, q[r, c]] (codes from `block_codes`)."""
    m, k = x.shape
    nb = blocked.shape[0]
    scratch = torch.empty(m, k, TAB, dtype=torch.float32)
    y = torch.empty(m, nb * BLOCK, dtype=torch.float32)
    lib.lut_col_matvec(x.data_ptr(), m, k, table16.data_ptr(), blocked.data_ptr(), nb, scratch.data_ptr(),
                       y.data_ptr(), torch.get_num_threads())
    return y[:, :n]


def row_matvec(lib, x: torch.Tensor, table16: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """x [M, K] float32 contiguous → x·Ŵᵀ [M, N], ŵ[r, c] = table16[r, q[r, c]], codes [N, K] row-major."""
    m, k = x.shape
    n = codes.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    lib.lut_row_matvec(x.data_ptr(), m, k, table16.data_ptr(), codes.data_ptr(), n, y.data_ptr(),
                       torch.get_num_threads())
    return y


def additive_matvec(lib, x: torch.Tensor, codebooks: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [Mx, cols] float32 → x·Ŵᵀ [Mx, N] for AQLM codes uint8 [N, J, M] (codebooks float32 [M, K, g], scale
    float32 [N]): the per-call table P[j, m, k] = C_m[k]·x_j, then one look-up per code."""
    mx = x.shape[0]
    M, K, g = codebooks.shape
    n, J, _ = codes.shape
    P = torch.einsum("xjg,mkg->xjmk", x.reshape(mx, J, g), codebooks).contiguous()  # [Mx, J, M, K]
    y = torch.empty(mx, n, dtype=torch.float32)
    lib.additive_matvec(P.data_ptr(), mx, J * M, K, codes.data_ptr(), scale.data_ptr(), n, y.data_ptr(),
                        torch.get_num_threads())
    return y
