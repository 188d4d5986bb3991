"""A few loops in C, compiled on this machine at first use: passes that torch can only write as a
chain of whole-tensor ops.

int8-dynamic quantizes every linear layer's input per row (graft.kernels.int8.quantize_rows):
max|x| per row, then floor(x / s + 0.5) + 128 as uint8. Written with torch's ops that is nine
passes over the tensor (amax, amin, mul, add, floor, to int8, a byte flip...); here it is two, the
row still in cache for the second. Timed on an AMD EPYC, one thread, bitwise the same output:
(768, 384) 119 -> 34 us, (768, 1536) 422 -> 91 us, (4096, 1536) 5.5 -> 0.74 ms, one decoding row
17 -> 3 us. torch's version takes 75 / 232 us on 2 threads, so one thread here beats both. Large
inputs split their rows among torch's threads (the same bytes).

The feed-forward's middle under int8-dynamic (graft.kernels.int8.activated_rows): the up
projection's product times the rows' scales plus the bias, GELU (erf) or ReLU, then the rows
quantized again for the down projection. torch's chain is five passes over the (rows, 1536)
tensor and GELU through exp; here two, GELU's erf a ratio of two polynomials (within 5e-7 of erf).
On an AMD EPYC (AVX2) at (768, 1536): 2.3 -> 1.2 ms on one thread, 2.0 -> 0.67 ms on two; the whole
int8 MiniLM forward at batch 32 x 24 tokens 124 -> 114 ms (medians of 12, 2 threads).

int8-weight's few-row product (``int8_weight_mm``) reads the int8 weight itself (see its notes).

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

from graft.kernels.calibrate import cache_folder, cpu_flags, processor

log = logging.getLogger("graft")

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>

/* One row of h -> uint8 floor(h / s + 0.5) + zero, s = max(max|h|, tiny) / levels: its scale */
static inline float quantize_row(const float *restrict row, int64_t cols, float hi, float lo,
                                 uint8_t *restrict out, float tiny, float levels, int32_t zero) {
    float top = hi > -lo ? hi : -lo;
    float s = (top > tiny ? top : tiny) / levels;
    float inv = 1.0f / s;
    for (int64_t j = 0; j < cols; ++j) {
        int32_t v = (int32_t)floorf(row[j] * inv + 0.5f);
        out[j] = (uint8_t)(v + zero);
    }
    return s;
}

/* (rows, cols) fp32 -> (rows, cols) uint8 floor(x / s + 0.5) + zero and (rows,) fp32 scales
   s = max(max|x|, tiny) / levels, each row on its own: graft.kernels.int8.quantize_rows. The
   rows split among `threads` OpenMP threads (torch's own pool: the same libgomp). */
void quantize_rows(const float *restrict x, int64_t rows, int64_t cols, uint8_t *restrict q,
                   float *restrict scale, float tiny, float levels, int32_t zero, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads) if(threads > 1 && rows * cols >= 131072)
    for (int64_t i = 0; i < rows; ++i) {
        const float *restrict row = x + i * cols;
        float hi = 0.0f, lo = 0.0f;
        for (int64_t j = 0; j < cols; ++j) {
            hi = fmaxf(hi, row[j]);
            lo = fminf(lo, row[j]);
        }
        scale[i] = quantize_row(row, cols, hi, lo, q + i * cols, tiny, levels, zero);
    }
}

/* erf(a) as a ratio of two polynomials in a (Eigen's generic_fast_erf_float): within 5e-7 of
   erf over the floats, and plain arithmetic the compiler vectorizes (torch's erf goes through exp) */
static inline float erf_rational(float a) {
    float x = fminf(fmaxf(a, -4.0f), 4.0f), x2 = x * x;  /* |x| >= 4: erf is +-1 in fp32 */
    float p = -2.72614225801306e-10f;
    p = p * x2 + 2.77068142495902e-08f;
    p = p * x2 - 2.10102402082508e-06f;
    p = p * x2 - 5.69250639462346e-05f;
    p = p * x2 - 7.34990630326855e-04f;
    p = p * x2 - 2.95459980854025e-03f;
    p = p * x2 - 1.60960333262415e-02f;
    float q = -1.45660718464996e-05f;
    q = q * x2 - 2.13374055278905e-04f;
    q = q * x2 - 1.68282697438203e-03f;
    q = q * x2 - 7.37332916720468e-03f;
    q = q * x2 - 1.42647390514189e-02f;
    return x * p / q;
}

/* int8-dynamic's feed-forward middle, (rows, cols): h = act(acc * row_scale + bias), written over
   acc, then h's rows quantized as quantize_rows does them (the row still in cache); act 0: none,
   1: GELU (erf), 2: ReLU; bias may be NULL: graft.kernels.int8.activated_rows. */
void activate_quantize_rows(float *restrict acc, int64_t rows, int64_t cols, const float *restrict row_scale,
                            const float *restrict bias, int32_t act, uint8_t *restrict q,
                            float *restrict scale, float tiny, float levels, int32_t zero, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads) if(threads > 1 && rows * cols >= 131072)
    for (int64_t i = 0; i < rows; ++i) {
        float *restrict row = acc + i * cols;
        float s = row_scale[i], hi = 0.0f, lo = 0.0f;
        for (int64_t j = 0; j < cols; ++j) {
            float v = row[j] * s + (bias ? bias[j] : 0.0f);
            if (act == 1)
                v = 0.5f * v * (1.0f + erf_rational(v * 0.70710678118654752f));
            else if (act == 2)
                v = fmaxf(v, 0.0f);
            row[j] = v;
            hi = fmaxf(hi, v);
            lo = fminf(lo, v);
        }
        scale[i] = quantize_row(row, cols, hi, lo, q + i * cols, tiny, levels, zero);
    }
}

/* sum_k w[k] x[k] over n (a multiple of 32) int8 weights and fp32 inputs: 32 running sums */
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
static inline __m256 widen(const int8_t *p) {  /* 8 int8 -> 8 floats (vpmovsxbd, vcvtdq2ps) */
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
static inline float dot(const int8_t *restrict w, const float *restrict x, int64_t n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < n; k += 32) {
        a0 = _mm256_fmadd_ps(widen(w + k), _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(widen(w + k + 8), _mm256_loadu_ps(x + k + 8), a1);
        a2 = _mm256_fmadd_ps(widen(w + k + 16), _mm256_loadu_ps(x + k + 16), a2);
        a3 = _mm256_fmadd_ps(widen(w + k + 24), _mm256_loadu_ps(x + k + 24), a3);
    }
    __m256 a = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}
#else  /* the compiler vectorizes the lanes (int8 -> int32 -> float, multiply, add) */
static inline float dot(const int8_t *restrict w, const float *restrict x, int64_t n) {
    float acc[32] = {0};
    for (int64_t k = 0; k < n; k += 32)
        for (int j = 0; j < 32; ++j)
            acc[j] += (float)w[k + j] * x[k + j];
    for (int step = 16; step > 0; step /= 2)
        for (int j = 0; j < step; ++j)
            acc[j] += acc[j + step];
    return acc[0];
}
#endif

/* y (rows, out) = x (rows, cols) fp32 times the int8 weight (out, cols) with one fp32 scale per
   output channel: y[r, o] = scale[o] * sum_k w[o, k] x[r, k], each weight row read once (the few
   rows of x stay in cache); cols a multiple of 32. The output channels split among `threads`
   OpenMP threads (torch's own pool: the same libgomp). */
void int8_weight_mm(const float *restrict x, int64_t rows, int64_t cols, const int8_t *restrict w,
                    const float *restrict scale, int64_t out, float *restrict y, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads) if(threads > 1 && out * cols >= 65536)
    for (int64_t o = 0; o < out; ++o)
        for (int64_t r = 0; r < rows; ++r)
            y[r * out + o] = dot(w + o * cols, x + r * cols, cols) * scale[o];
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
OPENMP = ("-fopenmp",)  # the loops' threads; a compiler without OpenMP builds them serial
ENV = "GRAFT_NATIVE"  # "0": never build or load the C loops (torch's ops only)


def library_path() -> Path:
    """Where this CPU's build of SOURCE is kept: the name holds the processor and a hash of the
    source, flags, compiler and the CPU's instruction sets (one model name can stand for CPUs with
    and without AVX-512, and a build for one would crash on the other)."""
    key = "\n".join((SOURCE, " ".join(FLAGS), compiler(), cpu_flags()))
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    cpu = re.sub(r"[^A-Za-z0-9.]+", "-", processor()).strip("-")
    return cache_folder() / f"native-{cpu}-{digest}.so"


def compiler() -> str:
    return os.environ.get("CC") or "cc"


def build(path: Path) -> None:
    """Compile SOURCE into ``path`` (atomically: a reader never sees half a library)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        source, target = Path(tmp) / "native.c", Path(tmp) / path.name
        source.write_text(SOURCE)
        command = [compiler(), *FLAGS, str(source), "-o", str(target), "-lm"]
        try:
            subprocess.run([*command, *OPENMP], check=True, capture_output=True, text=True, timeout=120)
        except subprocess.CalledProcessError:
            subprocess.run(command, check=True, capture_output=True, text=True, timeout=120)
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
                                  ctypes.c_void_p, ctypes.c_float, ctypes.c_float, ctypes.c_int32, ctypes.c_int]  # fmt: skip
    lib.quantize_rows.restype = None
    lib.activate_quantize_rows.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                           ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p,
                                           ctypes.c_float, ctypes.c_float, ctypes.c_int32, ctypes.c_int]  # fmt: skip
    lib.activate_quantize_rows.restype = None
    lib.int8_weight_mm.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                   ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]  # fmt: skip
    lib.int8_weight_mm.restype = None
    return lib


def platform_unsupported() -> bool:
    """-march=native and ctypes' calling convention: x86-64 and arm64 Linux/macOS only."""
    return platform.system() not in ("Linux", "Darwin") or platform.machine() not in (
        "x86_64",
        "AMD64",
        "arm64",
        "aarch64",
    )


def quantize_rows(
    x: torch.Tensor, tiny: float, levels: int, zero: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
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
    lib.quantize_rows(x.data_ptr(), rows, cols, q.data_ptr(), scale.data_ptr(), tiny, levels, zero,
                      torch.get_num_threads())  # fmt: skip
    return q, scale


ACTIVATION_CODES = {None: 0, "gelu": 1, "relu": 2}  # activate_quantize_rows' act argument


def activate_quantize_rows(
    acc: torch.Tensor,
    row_scale: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | None,
    tiny: float,
    levels: int,
    zero: int,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """quantize_rows(activation(acc * row_scale + bias)) for (N, out) fp32 ``acc`` and (N, 1)
    ``row_scale``, the activated rows written over ``acc``; or None where the C loop does not apply
    (no library, an activation it lacks, not contiguous CPU fp32 tensors)."""
    code = ACTIVATION_CODES.get(activation)
    tensors = (acc, row_scale) if bias is None else (acc, row_scale, bias)
    if (
        code is None
        or acc.dim() != 2
        or row_scale.numel() != acc.shape[0]
        or (bias is not None and bias.numel() != acc.shape[1])
        or any(
            t.dtype != torch.float32 or not t.is_cpu or t.requires_grad or not t.is_contiguous()
            for t in tensors
        )
    ):
        return None
    lib = library()
    if lib is None:
        return None
    rows, cols = acc.shape
    q = torch.empty(rows, cols, dtype=torch.uint8)
    scale = torch.empty(rows, 1)
    lib.activate_quantize_rows(acc.data_ptr(), rows, cols, row_scale.data_ptr(), 0 if bias is None else bias.data_ptr(),
                               code, q.data_ptr(), scale.data_ptr(), tiny, levels, zero, torch.get_num_threads())  # fmt: skip
    return q, scale


def int8_weight_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """(N, in) fp32 times the (out, in) int8 ``weight`` with (out,) fp32 ``scale`` per output
    channel -> (N, out) fp32, on torch's threads; or None where the C loop does not apply (no
    library, not CPU fp32 / int8 tensors, ``in`` not a multiple of 32)."""
    rows, cols = x.shape
    if (
        x.dtype != torch.float32
        or not x.is_cpu
        or x.requires_grad
        or cols % 32
        or weight.dtype != torch.int8
        or not weight.is_cpu
        or not weight.is_contiguous()
        or scale.dtype != torch.float32
    ):
        return None
    lib = library()
    if lib is None:
        return None
    x, scale = x.contiguous(), scale.contiguous()
    out = weight.shape[0]
    y = torch.empty(rows, out)
    lib.int8_weight_mm(x.data_ptr(), rows, cols, weight.data_ptr(), scale.data_ptr(), out, y.data_ptr(),
                       torch.get_num_threads())  # fmt: skip
    return y
