"""Int8 linear layers on torch's int8 CPU kernels (chapter 8: compression).

``Int8Linear`` holds an int8 weight with one fp32 scale per output channel (symmetric:
w ~= weight * weight_scale[:, None], |weight| <= 127) and runs in one of two ways:

- ``"dynamic"`` (int8-dynamic): each row of the input (a token) is quantized at run time with its
  own scale, s = max|x| / 127, and the product runs on oneDNN's u8 x s8 matmul with int32
  accumulation (``torch.ops.onednn.qlinear_pointwise``, VNNI/AMX where the CPU has them); the
  output is acc * weight_scale * s + bias. The per-row scale factors out of the dot product, so
  it is applied to the output in one pass.
- ``"weight"`` (int8-weight): activations stay float. A few rows (decoding) are multiplied by the
  int8 weight itself, a quarter of fp32's bytes, the cost of a memory-bound step: graft's C loop
  (graft.kernels.native.int8_weight_mm: int8 -> float in registers, fp32 sums), else torch's
  ``_weight_int8pack_mm`` in bf16. Many rows dequantize the weight once per call and take a float
  matmul (compute-bound: int8 weights would not make it faster), in bf16 where oneDNN has bf16
  products (AVX-512, AMX), else in fp32.

The output layer over a vocabulary that is tied to an int8 token table (``tied_output``: SmolLM2's
and GPT-2's LM heads, T5's and BART's, BERT's MLM decoder) is an int8-weight layer reading the
table's own int8 rows and scales. On an AMD EPYC 7003 (AVX2, no AVX-512), one thread, one row of
SmolLM2's (49152, 576) head: fp32 10.5 ms, torch's _weight_int8pack_mm 6.1 ms, the C loop 2.5 ms.

Timed single-threaded on an AMD EPYC (AVX-512 VNNI) at MiniLM's shapes, (768 rows, 384 -> 1536):
fp32 on oneDNN packed weights 3.8 ms, bf16 2.0 ms, the u8 x s8 matmul 0.9 ms (torch._int_mm
the same, plus an int32 -> float pass), quantizing the rows 0.4 ms; at one row of SmolLM2's
576 -> 49152 head: fp32 packed 4.4 ms, int8 dynamic 0.7 ms, _weight_int8pack_mm 1.6 ms.
_weight_int8pack_mm with fp32 inputs takes a slow generic loop (50x): bf16 only; and it crashes
(torch 2.13, AVX-512) when the input width is not a multiple of 32: those layers dequantize.

One scale per call instead of per row (ONNX Runtime's dynamic scheme) would let oneDNN apply the
scales, the bias and GELU to the output tile: measured on MiniLM at batch 32 x 24 tokens, 2-6%
faster than this per-row path, but the embeddings' lowest cosine to fp32 on 300 BBC articles fell
from 0.996 to 0.987, so graft keeps one scale per row.

Where torch lacks oneDNN's int8 ops (or off CPU), the same numbers come from the written-out
float math (``reference_linear``). The packed weight (oneDNN's layout) is made at first use and
kept on the layer (``Packs``), not in the state dict.
"""

from __future__ import annotations

import platform
import threading

import torch
import torch.nn.functional as F
from torch import nn

from graft.kernels import native
from graft.kernels.linear import ONEDNN_BF16, linear
from graft.nn.feedforward import ACTIVATIONS as FUNCTIONS  # activation name -> function

ACTIVATIONS = ("dynamic", "weight")  # how the input is treated: quantized per row, or kept float
# graft quantize's methods -> how their Int8Linear treats its input (None: no int8 layers, bf16 weights)
METHODS: dict[str, str | None] = {"int8-dynamic": "dynamic", "int8-weight": "weight", "bf16": None}
INT8_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")
FEW_ROWS = 16  # up to this many rows, int8-weight multiplies on the int8 weight (memory-bound)
TINY = 1e-12  # the smallest scale: an all-zero row or channel quantizes to zeros, not NaN


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> (out, in) int8 and (out,) fp32 scales, symmetric per output channel."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(TINY) / 127  # (out,)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)  # (out, in)
    return q, scale


def pairs_saturate() -> bool:
    """Whether oneDNN's u8 x s8 product adds pairs of products in int16 on this CPU: x86 without
    VNNI (AVX2; AVX-512 before Cascade Lake) multiplies with vpmaddubsw, whose pair sums saturate
    at 32767 (255 * 127 * 2 is 64770). Measured on an AMD EPYC 7003 (AVX2): outputs off by 17 on
    a layer whose float outputs err by 1 from the int8 ones' reference."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False  # arm64's dot products accumulate in int32
    flags = set(native.cpu_flags().split())
    return not flags & {"avx512_vnni", "avx_vnni", "amx_int8"}


# How rows are coded (uint8 q + ZERO, |q| <= LEVELS): 8 bits where pairs of products are exact,
# else 7 (|q| <= 63, zero point 64: a pair sums to at most 127 * 127 * 2, as fbgemm's reduce_range)
LEVELS, ZERO = (63, 64) if pairs_saturate() else (127, 128)


def to_uint8(q: torch.Tensor, zero: int) -> torch.Tensor:
    """int8 values v -> uint8 v + ``zero`` (128 or 64), in place: for 128 flipping the sign bit
    is the shift; v + 64 (|v| <= 63) stays within int8's range.

    oneDNN multiplies u8 x s8 (its s8 x s8 is a reference loop, thousands of times slower), and
    torch converts float to int8 4-5x faster than to uint8: so the rows round into int8, then shift.
    """
    if zero == 128:
        return q.view(torch.uint8).bitwise_xor_(128)
    return q.add_(zero).view(torch.uint8)


def quantize_rows(
    x: torch.Tensor, levels: int = LEVELS, zero: int = ZERO
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, in) float -> (N, in) uint8 holding floor(x / s + 0.5) + ``zero`` and (N, 1) fp32 scales
    s = max|x| / ``levels`` (|x / s| <= levels: no clamp needed); see LEVELS and ZERO.

    Plain single-pass ops (amax, amin, mul, add, floor, to int8, a shift): at MiniLM's
    (768, 1536) 2.5x faster than adding 128.5 by addcmul (whose 0-dim input takes a slow
    broadcast) and truncating to uint8 (a conversion torch does not vectorize). Ties round up,
    as they did then: SmolLM2's perplexity on a short paragraph moved +0.9% -> +3.8% with
    round-half-even instead (a step in a row of its outlier token is large).

    graft.kernels.native computes the same bytes in two passes where its C loop is built; else
    ``torch_quantize_rows``.
    """
    x = x.float()
    fast = native.quantize_rows(x, TINY, levels, zero)
    return fast if fast is not None else torch_quantize_rows(x, levels, zero)


def torch_quantize_rows(
    x: torch.Tensor, levels: int = LEVELS, zero: int = ZERO
) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_rows`` written with torch's ops (nine passes over x)."""
    x = x.float()
    # amax and amin: no copy, 20x faster than linalg.vector_norm(x, inf), which does not vectorize
    scale = torch.maximum(x.amax(dim=-1, keepdim=True), x.amin(dim=-1, keepdim=True).neg_())
    scale = scale.clamp_min_(TINY).div_(levels)  # (N, 1)
    q = x.mul(scale.reciprocal()).add_(0.5).floor_().to(torch.int8)  # (N, in) in [-levels, levels]
    return to_uint8(q, zero), scale  # (N, in), (N, 1)


class Packs:
    """The weight in oneDNN's int8 layout (and the scales in bf16), made at first use; a copy of the
    layer starts empty."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.packed: torch.Tensor | None = None
        self.zeros: torch.Tensor | None = None
        self.version: tuple[int, int] | None = None
        self.bf16_scale: torch.Tensor | None = None  # int8-weight's scales for _weight_int8pack_mm
        self.scale_version: tuple[int, int] | None = None

    def __deepcopy__(self, memo: dict) -> Packs:
        return Packs()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


class Rows:
    """The last input that sibling int8-dynamic layers quantized, per thread: Q, K and V (and
    gate and up) read the same tensor, quantized then once instead of three times. Shared by the
    layers ``quantize_linears`` makes under one parent module; a copy starts empty."""

    def __init__(self) -> None:
        self.local = threading.local()

    def quantize(self, x: torch.Tensor, inp: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``quantize_rows`` of ``x`` seen as (N, inp), reused while ``x`` is the same, unchanged tensor."""
        # inference tensors keep no version: siblings are called one after the other on one input
        version = -1 if x.is_inference() else x._version
        last = getattr(self.local, "last", None)
        if last is not None and last[0] is x and last[1] == version:
            return last[2], last[3]
        q, scale = quantize_rows(x.reshape(-1, inp))
        self.local.last = (x, version, q, scale)  # holds x, so its identity is not reused meanwhile
        return q, scale

    def __deepcopy__(self, memo: dict) -> Rows:
        return Rows()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


class Int8Linear(nn.Module):
    """A linear layer with an int8 weight and per-output-channel scales (see the module's notes).

    State dict: ``weight`` (out, in) int8, ``weight_scale`` (out,) fp32, ``bias`` (out,) float or absent.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activations: str = "dynamic"):
        super().__init__()
        if activations not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {ACTIVATIONS}, not {activations!r}")
        self.in_features, self.out_features, self.activations = in_features, out_features, activations
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.packs = Packs()
        self.rows = Rows()  # quantize_linears gives a model's layers one Rows to share

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, activations: str = "dynamic", rows: Rows | None = None
    ) -> Int8Linear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, activations)
        if rows is not None:
            layer.rows = rows
        weight = linear.weight
        if weight.is_meta:  # a model built to check shapes (graft.loading): no values to quantize
            return layer.to("meta")
        q, scale = quantize_weight(weight)
        layer.weight.copy_(q)
        layer.weight_scale.copy_(scale)
        if linear.bias is not None:
            layer.bias = linear.bias.detach().clone()
        return layer.to(weight.device)

    @classmethod
    def tied_to(cls, table: Int8Embedding, bias: torch.Tensor | None = None) -> Int8Linear:
        """The output layer over ``table``'s vocabulary that reads its int8 rows and per-token scales
        (the same tensors: a token's scale is its output channel's), float inputs (int8-weight: the
        logits decide the next token, and the last hidden state has outlier channels)."""
        layer = cls(table.embedding_dim, table.num_embeddings, bias is not None, "weight")
        layer.weight, layer.weight_scale = table.weight, table.weight_scale
        if bias is not None:
            layer.bias = bias.detach()
        return layer

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, activations={self.activations}"
        )

    def dequantized(self) -> torch.Tensor:
        """The float weight this layer stands for: (out, in) fp32."""
        return self.weight.float() * self.weight_scale.float()[:, None]

    def onednn_rows(self, x: torch.Tensor) -> bool:
        """int8-dynamic on oneDNN's u8 x s8 product: float CPU rows that need no gradient."""
        return (
            self.activations == "dynamic"
            and INT8_ONEDNN
            and x.is_cpu
            and x.dtype in (torch.float32, torch.bfloat16)
            and not x.requires_grad
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        if self.activations == "dynamic":
            return self.onednn_dynamic(x) if self.onednn_rows(x) else reference_linear(x, self)
        rows = x.numel() // self.in_features
        if not x.is_cpu or x.requires_grad:
            return reference_linear(x, self)
        # memory-bound: read the int8 weight itself (graft's C loop, else torch's kernel, which
        # crashes on widths not a multiple of 32)
        y = None
        if rows <= FEW_ROWS:
            flat = x.reshape(rows, self.in_features)
            y = native.int8_weight_mm(flat.float(), self.weight, self.weight_scale)
            if y is None and self.in_features % 32 == 0:
                y = torch.ops.aten._weight_int8pack_mm(
                    flat.bfloat16(), self.weight, self.bf16_scale()
                )  # (rows, out)
        if y is not None:
            y = y.reshape(*x.shape[:-1], self.out_features)
        else:  # compute-bound: the weight dequantized once per call, a bf16 product where oneDNN has one
            dtype = torch.bfloat16 if ONEDNN_BF16 else torch.float32
            w = self.dequantized().to(dtype)  # (out, in)
            y = linear(x.to(dtype), w)
        return (
            y.to(x.dtype) if self.bias is None else y.to(x.dtype) + self.bias.to(x.dtype)
        )  # (bias unrounded)

    def bf16_scale(self) -> torch.Tensor:
        """``weight_scale`` in bf16, made once per version of the scales (decoding calls it every step)."""
        packs, scale = self.packs, self.weight_scale
        version = (scale.data_ptr(), -1 if scale.is_inference() else scale._version)
        if packs.scale_version != version:
            packs.bf16_scale, packs.scale_version = scale.bfloat16(), version
        return packs.bf16_scale

    def packed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(the weight in oneDNN's int8 layout, its zero points), made once per weight version."""
        packs = self.packs
        w = self.weight  # (an inference tensor, made in inference mode, keeps no version)
        version = (w.data_ptr(), -1 if w.is_inference() else w._version)
        if packs.version != version:
            with packs.lock:
                if packs.version != version:
                    packs.packed = torch.ops.onednn.qlinear_prepack(self.weight, None)
                    packs.zeros = torch.zeros(self.out_features, dtype=torch.long)
                    packs.version = version
        return packs.packed, packs.zeros

    def onednn_dynamic(self, x: torch.Tensor) -> torch.Tensor:
        q, scale = self.rows.quantize(x, self.in_features)  # (N, in) uint8, (N, 1)
        return self.rows_output(q, scale).to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def product(self, q: torch.Tensor) -> torch.Tensor:  # (N, in) uint8 -> (N, out) fp32
        """sum_k (q - ZERO) * weight * weight_scale: the output before the rows' scales and the bias."""
        packed, zeros = self.packed()
        return torch.ops.onednn.qlinear_pointwise(
            q,
            1.0,
            ZERO,
            packed,
            self.weight_scale.float(),
            zeros,
            None,
            1.0,
            0,
            torch.float32,
            "none",
            [],
            "",
        )

    def rows_output(self, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The layer's (N, out) fp32 output from (N, in) rows already quantized, with their (N, 1)
        scales (``quantize_rows``)."""
        y = self.product(q)
        return y.mul_(scale) if self.bias is None else torch.addcmul(self.bias.float(), y, scale, out=y)


def activated_rows(
    acc: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, activation: str | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_rows(activation(acc * scale + bias)) for an int8-dynamic layer's (N, out) ``product``
    and its rows' (N, 1) scales: the feed-forward's middle, whose output only the next int8-dynamic
    layer reads. graft's C loop does it in two passes over the (N, out) tensor, GELU by a rational
    approximation of erf within 5e-7 (torch's pass chain is five: addcmul, activation, quantize);
    ``acc`` is overwritten."""
    b = None if bias is None else bias.float()
    fast = native.activate_quantize_rows(acc, scale, b, activation, TINY, LEVELS, ZERO)
    if fast is not None:
        return fast
    h = acc.mul_(scale) if b is None else torch.addcmul(b, acc, scale, out=acc)
    return quantize_rows(h if activation is None else FUNCTIONS[activation](h))


class Int8Embedding(nn.Module):
    """A token embedding table in int8 with one fp32 scale per token (row): a lookup reads the int8
    rows and scales them, a quarter of fp32's bytes on disk and in memory (MiniLM's table is half
    of its weights). State dict: ``weight`` (V, E) int8, ``weight_scale`` (V,) fp32."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("weight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(num_embeddings))

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> Int8Embedding:
        layer = cls(embedding.num_embeddings, embedding.embedding_dim)
        if embedding.weight.is_meta:
            return layer.to("meta")
        q, scale = quantize_weight(embedding.weight)  # per row: each token its own scale
        layer.weight.copy_(q)
        layer.weight_scale.copy_(scale)
        return layer.to(embedding.weight.device)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (...) -> (..., E) fp32
        rows = F.embedding(ids, self.weight).float()  # (..., E)
        return rows * self.weight_scale.float()[ids].unsqueeze(-1)


def tied_output(table: nn.Module, layer: nn.Linear) -> nn.Module:
    """``layer``, an output layer over the vocabulary, tied to the token ``table``: the float layer
    with the table's weight, or for an int8 table the Int8Linear reading it (``Int8Linear.tied_to``,
    ``layer``'s bias kept): one tensor for the lookup and the logits either way."""
    if isinstance(table, Int8Embedding):
        return Int8Linear.tied_to(table, layer.bias)
    layer.weight = table.weight
    return layer


def reference_linear(x: torch.Tensor, layer: Int8Linear) -> torch.Tensor:
    """What ``layer`` computes, written out in float: the rows quantized as the kernel does (for
    "dynamic"), times the dequantized weight. Off CPU, with gradients, or without oneDNN's ops."""
    if layer.activations == "dynamic":
        q, scale = quantize_rows(x.reshape(-1, layer.in_features))
        x = ((q.float() - ZERO) * scale).reshape(x.shape).to(x.dtype)
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return F.linear(x, layer.dequantized().to(x.dtype), bias)


def quantize_linears(module: nn.Module, activations: str, prefix: str = "") -> list[str]:
    """Replace every nn.Linear inside ``module`` by an Int8Linear (in place); the replaced names.

    A module reached twice (shared) is replaced once and stays shared.
    """
    done: dict[int, Int8Linear] = {}
    names = []
    for parent_name, parent in list(module.named_modules(prefix=prefix, remove_duplicate=False)):
        rows = Rows()  # siblings (Q, K, V; gate, up) read the same input
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and not isinstance(child, Int8Linear):
                if id(child) not in done:
                    done[id(child)] = Int8Linear.from_linear(child, activations, rows)
                    names.append(f"{parent_name}.{name}" if parent_name else name)
                setattr(parent, name, done[id(child)])
    return names
