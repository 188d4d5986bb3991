"""A few loops in C, compiled on this machine at first use: passes that torch can only write as a
chain of whole-tensor ops.

int8-dynamic quantizes every linear layer's input per row (graft.kernels.int8.quantize_rows):
max|x| per row, then floor(x / s + 0.5) + 128 as uint8. Written with torch's ops that is nine
passes over the tensor (amax, amin, mul, add, floor, to int8, a byte flip...); here it is two, the
row still in cache for the second. Timed on an AMD EPYC, one thread, bitwise the same output:
(768, 384) 119 -> 34 us, (768, 1536) 422 -> 91 us, (4096, 1536) 5.5 -> 0.74 ms, one decoding row
17 -> 3 us. torch's version takes 75 / 232 us on 2 threads, so one thread here beats both.

The source is compiled with the C compiler found as $CC or ``cc`` for this CPU (-march=native;
the file's name holds the processor and a hash of the source, flags and CPU features) into graft's kernels cache
folder ($XDG_CACHE_HOME/graft/kernels, beside the routes' timings), written atomically, and loaded
with ctypes, which releases the GIL while a loop runs. No compiler, a failed build or a cache that
cannot be written: one line in the log, and torch's ops compute the same numbers. The flags keep
the arithmetic IEEE (no contraction of x * inv + 0.5 into one rounding); they let the compiler
vectorize max and floor, assuming finite inputs: a row holding inf or NaN quantizes to
unspecified values on both paths.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from graft.kernels.calibrate import cache_folder, processor

log = logging.getLogger("graft")

SOURCE = r"""
#include <stdint.h>
#include <math.h>

/* (rows, cols) fp32 -> (rows, cols) uint8 floor(x / s + 0.5) + 128 and (rows,) fp32 scales
   s = max(max|x|, tiny) / 127, each row on its own: graft.kernels.int8.quantize_rows. */
void quantize_rows(const float *restrict x, int64_t rows, int64_t cols, uint8_t *restrict q,
                   float *restrict scale, float tiny) {
    for (int64_t i = 0; i < rows; ++i) {
        const float *restrict row = x + i * cols;
        float hi = 0.0f, lo = 0.0f;
        for (int64_t j = 0; j < cols; ++j) {
            hi = fmaxf(hi, row[j]);
            lo = fminf(lo, row[j]);
        }
        float top = hi > -lo ? hi : -lo;
        float s = (top > tiny ? top : tiny) / 127.0f;
        float inv = 1.0f / s;
        scale[i] = s;
        uint8_t *restrict out = q + i * cols;
        for (int64_t j = 0; j < cols; ++j) {
            int32_t v = (int32_t)floorf(row[j] * inv + 0.5f);
            out[j] = (uint8_t)(v + 128);
        }
    }
}
"""
# IEEE arithmetic (no fused multiply-add), but max and floor vectorized (finite inputs)
FLAGS = (
    "-O3",
    "-march=native",
    "-ffp-contract=off",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-ffinite-math-only",
    "-fno-signed-zeros",
    "-shared",
    "-fPIC",
)
ENV = "GRAFT_NATIVE"  # "0": never build or load the C loops (torch's ops only)


def library_path() -> Path:
    """Where this CPU's build of SOURCE is kept: the name holds the processor and a hash of the
    source, flags, compiler and the CPU's instruction sets (one model name can stand for CPUs with
    and without AVX-512, and a build for one would crash on the other)."""
    key = "\n".join((SOURCE, " ".join(FLAGS), compiler(), cpu_flags()))
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    cpu = re.sub(r"[^A-Za-z0-9.]+", "-", processor()).strip("-")
    return cache_folder() / f"native-{cpu}-{digest}.so"


def cpu_flags() -> str:
    """The CPU's feature flags as /proc/cpuinfo lists them ("" where there is no such file)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def compiler() -> str:
    return os.environ.get("CC") or "cc"


def build(path: Path) -> None:
    """Compile SOURCE into ``path`` (atomically: a reader never sees half a library)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        source, target = Path(tmp) / "native.c", Path(tmp) / path.name
        source.write_text(SOURCE)
        subprocess.run([compiler(), *FLAGS, str(source), "-o", str(target), "-lm"], check=True,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
        os.replace(target, path)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled loops (built at the first call in this process if not cached), or None."""
    if os.environ.get(ENV, "1").strip() == "0" or platform_unsupported():
        return None
    path = library_path()
    try:
        if not path.exists():
            if shutil.which(compiler()) is None:
                log.info("graft kernels: no C compiler (%s), int8 rows quantize with torch's ops", compiler())
                return None
            build(path)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        log.info("graft kernels: the C loops did not build (%s); torch's ops instead", detail.strip()[:200])
        return None
    lib.quantize_rows.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                  ctypes.c_void_p, ctypes.c_float]  # fmt: skip
    lib.quantize_rows.restype = None
    return lib


def platform_unsupported() -> bool:
    """-march=native and ctypes' calling convention: x86-64 and arm64 Linux/macOS only."""
    return platform.system() not in ("Linux", "Darwin") or platform.machine() not in (
        "x86_64",
        "AMD64",
        "arm64",
        "aarch64",
    )


def quantize_rows(x: torch.Tensor, tiny: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(N, in) fp32 -> (N, in) uint8 and (N, 1) fp32 as graft.kernels.int8.quantize_rows computes
    them, or None where the C loop does not apply (no library, not a contiguous CPU fp32 tensor)."""
    if x.dtype != torch.float32 or not x.is_cpu or x.requires_grad or x.dim() != 2:
        return None
    lib = library()
    if lib is None:
        return None
    x = x.contiguous()
    rows, cols = x.shape
    q = torch.empty(rows, cols, dtype=torch.uint8)
    scale = torch.empty(rows, 1)
    lib.quantize_rows(x.data_ptr(), rows, cols, q.data_ptr(), scale.data_ptr(), tiny)
    return q, scale
