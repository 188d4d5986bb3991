"""graft's translations of torch ops into ONNX, where torch.onnx's own cost time (chapter 8).

The dynamo exporter translates each aten op with onnxscript's torchlib; ``TRANSLATIONS`` replaces
two of them (torch.onnx.export's custom_translation_table), each with the same numbers in fewer or
fusable nodes. On all-MiniLM-L6-v2 (a classification head, 1 thread) the plain graph went from 302
nodes to 230, and from 270 to 168 after ONNX Runtime's session optimizations (docs/export.md has
the times).

Attention. torchlib's F.scaled_dot_product_attention writes, in every layer: K transposed through
a 3-D reshape (Shape, three Slices, two Concats, two Reshapes around a Transpose: K copied twice,
and ONNX Runtime cannot merge that Transpose with the head split's), Q and K^T each multiplied by
sqrt(scale), and a Where(IsNaN) pass over the probabilities. graft's writes the definition:

    MatMul(Softmax(MatMul(Mul(q, scale), Transpose(k, [0, 1, 3, 2])) + mask), v)

- K^T is one Transpose: the exporter's optimizer merges it with the head split's Transpose(k,
  [0, 2, 1, 3]) into one, as transformers' TorchScript export has.
- Q is scaled once, on (B, nh, T, hd) (smaller than the (B, nh, T, S) scores when S > hd), and
  not at all when the scale is 1. ONNX Runtime's session folds that Mul into the scores' MatMul
  (FusedMatMul's alpha), so folding the scale into the Q projection's weights would save nothing.
- A boolean mask becomes 0 / the dtype's lowest value with one Where; every layer reads the same
  mask, so the exporter's common-subexpression pass keeps one Where per graph.
- No NaN guard: the lowest value is finite, so a row whose keys are all masked gets uniform
  weights, never NaN (torchlib's guard could not fire either). Exported folders refuse such rows
  (graft/export/runtime.py empty_row).

Grouped-query attention (fewer key/value heads), a causal flag or dropout go to torchlib's own
translation: graft's graphs build their masks themselves (graph.py), run in eval mode, and the
decoders' grouped heads are left to torchlib's repeat of K and V.

GELU (erf). torchlib writes x * (0.5 * (1 + erf(x / sqrt 2))), which ONNX Runtime's GeluFusion
does not recognize (it looks for (x * 0.5) * (1 + erf(x / sqrt 2))): the plain graph then ran five
elementwise passes over every (B, T, 4H) feed-forward activation instead of one fused Gelu.
graft's writes the order the fusion looks for. The tanh approximation stays torchlib's.
"""

from __future__ import annotations

import math

from onnxscript import ir
from onnxscript.onnx_opset import opset18 as op
from onnxscript.onnx_types import TensorType


def scaled_dot_product_attention(
    query: TensorType,  # (B, nh, T, hd)
    key: TensorType,  # (B, nkv, S, hd)
    value: TensorType,  # (B, nkv, S, hd)
    attn_mask: TensorType | None = None,  # bool, True = may attend, or an additive float; (B|1, 1|nh, T, S)
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> TensorType:  # (B, nh, T, hd)
    """softmax(q k^T * scale + mask) v as ONNX nodes, traced by torch.onnx (the module docstring)."""
    head_dim, dtype = query.shape[-1], query.dtype  # (the traced nodes' outputs carry no dtype)
    grouped = enable_gqa and query.shape[1] != key.shape[1]
    if is_causal or dropout_p or grouped or (scale is None and not isinstance(head_dim, int)):
        from onnxscript.function_libs.torch_lib.ops.nn import aten_scaled_dot_product_attention

        return aten_scaled_dot_product_attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa
        )
    scale = scale if scale is not None else head_dim**-0.5
    if scale != 1.0:
        query = op.Mul(query, op.Constant(value=ir.tensor(scale, dtype=dtype)))
    scores = op.MatMul(query, op.Transpose(key, perm=[0, 1, 3, 2]))  # (B, nh, T, S)
    if attn_mask is not None:
        if attn_mask.dtype == ir.DataType.BOOL:
            zero = op.Constant(value=ir.tensor(0.0, dtype=dtype))
            lowest = op.Constant(value=ir.tensor(dtype.min, dtype=dtype))
            attn_mask = op.Where(attn_mask, zero, lowest)
        scores = op.Add(scores, attn_mask)
    return op.MatMul(op.Softmax(scores, axis=-1), value)


def gelu(self: TensorType, approximate: str = "none") -> TensorType:
    """GELU as ONNX Runtime's GeluFusion finds it: (x * 0.5) * (1 + erf(x / sqrt 2)) (the module
    docstring); the tanh approximation as torchlib writes it."""
    if approximate != "none":
        from onnxscript.function_libs.torch_lib.ops.nn import aten_gelu

        return aten_gelu(self, approximate)
    dtype = self.dtype
    erf = op.Erf(op.Div(self, op.Constant(value=ir.tensor(math.sqrt(2.0), dtype=dtype))))
    half = op.Mul(self, op.Constant(value=ir.tensor(0.5, dtype=dtype)))
    return op.Mul(half, op.Add(erf, op.Constant(value=ir.tensor(1.0, dtype=dtype))))


def translations() -> dict:
    """torch.onnx.export's custom_translation_table: aten op -> graft's translation."""
    import torch

    aten = torch.ops.aten
    return {aten.scaled_dot_product_attention.default: scaled_dot_product_attention, aten.gelu.default: gelu}
