"""Attention's CPU kernels: fused Q/K/V, one rotation for queries and keys, a decoding path for
grouped-query heads, short sequences at inference as matmul-softmax-matmul where this CPU runs
that faster than SDPA (timed per class of shapes: graft.kernels.calibrate), attention dropout
that keeps little for backward, the plain math inside a compiled decoding step, and the
fixed-size cache that step writes into.

``FastAttention`` is ``graft.nn.Attention`` (same layers, same state dict) with these paths; the
reference's ``forward`` runs whenever attention probabilities are asked for.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from graft.kernels.dropout import Redraw, dropout, keep_mask
from graft.kernels.linear import call, fused, plain
from graft.nn.attention import Attention, KVCache, Segments, take_rows
from graft.nn.positions import apply_rotary


class StaticKVCache(KVCache):
    """A KVCache that, once ``position`` is set, keeps a fixed size, for a compiled decoding step
    whose shapes must not change: ``update`` writes at ``position`` and returns the whole buffers,
    and the caller's mask hides what is not written yet (buffers start as zeros). Until then
    (the prompt, run eagerly) it grows as a KVCache does."""

    position: torch.Tensor | None = None  # (T,) long: where the next update writes

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position is None:
            return super().update(layer, k, v)
        self.keys[layer].index_copy_(2, self.position, k)  # (B, nkv, capacity, hd) whatever the length
        self.values[layer].index_copy_(2, self.position, v)
        return self.keys[layer], self.values[layer]


class FastAttention(Attention):
    """graft.nn.Attention on graft's CPU kernels."""

    kernels = None  # the model's Kernels, set by graft.kernels.optimize

    def project(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None,
        rows: torch.Tensor | None,
        packed: dict | None,
    ) -> tuple[torch.Tensor, ...]:
        """Queries from x (at ``rows`` only, when given); keys and values from x (self-attention)
        or the context (cross-attention).

        Projections of the same input by plain linear layers run as one matrix multiply over
        the concatenated weights (one pass over the input instead of two or three); wrapped
        layers (LoRA, adapters) take the separate path and still see every call.
        """
        src = x if context is None else context
        # not when decoding one position, unless the weights are packed once: otherwise copying
        # them costs more than reading x thrice
        fuse = (src.shape[1] > 1 or packed is not None) and plain(self.k) and plain(self.v)
        routes = self.kernels.calibration
        if context is None and rows is None and fuse and plain(self.q):
            return fused(x, (self.q, self.k, self.v), (self, "qkv"), packed, routes)
        q = call(self.q, x if rows is None else take_rows(x, rows), None, packed, routes)
        if fuse:
            return (q, *fused(src, (self.k, self.v), (self, "kv"), packed, routes))
        return q, call(self.k, src, None, packed, routes), call(self.v, src, None, packed, routes)

    def rotate(
        self, q: torch.Tensor, k: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary positions on (B, T, nh * hd) queries and (B, T, nkv * hd) keys of the same positions.

        At inference, when both are neighbouring columns of one fused projection, they turn as one
        tensor (half the small operations of a decoding step's rotation); otherwise one after the
        other.
        """
        cos, sin = (t.transpose(1, 2) for t in rotary)  # (B|1, T, 1, hd)
        heads = lambda t: t.unflatten(-1, (-1, self.head_dim))  # noqa: E731 (B, T, n * hd) -> (B, T, n, hd)
        width = q.shape[-1] + k.shape[-1]
        if (
            not q.requires_grad  # inference only: autograd would not see through as_strided's reach
            and not torch.compiler.is_compiling()  # (compiled, the rotations fuse anyway)
            and q.stride() == k.stride()
            and q.stride(-1) == 1
            and k.data_ptr() == q.data_ptr() + q.shape[-1] * q.element_size()
        ):
            qk = q.as_strided((*q.shape[:-1], width), q.stride())  # (B, T, width): the columns of both
            qk = apply_rotary(heads(qk), cos, sin).flatten(-2)
            return qk.split([q.shape[-1], k.shape[-1]], -1)
        return apply_rotary(heads(q), cos, sin).flatten(-2), apply_rotary(heads(k), cos, sin).flatten(-2)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, H)
        mask: torch.Tensor
        | Segments
        | None = None,  # bool (B|1, 1, T, S), float bias (B|1, nh, T, S), Segments
        is_causal: bool = False,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
        context: torch.Tensor | None = None,  # (B, S, H) for cross-attention
        rows: torch.Tensor | None = None,  # (B, K): only these queries' outputs are wanted
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # (B, T, H), or (B, K, H) with rows
        kept = cache is not None and self.cross and cache.cross(self.layer) is not None
        if output_attentions or kept:  # probabilities: only the written-out math has them;
            # cross-attention whose keys and values the cache keeps: only the queries to project
            return super().forward(x, mask, is_causal, rotary, cache, context, rows, output_attentions)
        packed = self.kernels.packed()
        B, S = x.shape[0], (x if context is None else context).shape[1]
        q, k, v = self.project(x, context, rows, packed)  # keys and values at every position, queries at rows
        T = q.shape[1]  # (T, or K with rows)
        same_positions = rows is None and context is None  # queries and keys
        if rotary is not None and same_positions:
            q, k = self.rotate(q, k, rotary)  # one rotation for both
        segments = mask if isinstance(mask, Segments) else None
        if segments is not None:  # texts end to end: projected as the tokens they are, attending as rows
            q, k, v = (segments.to_rows(t) for t in (q, k, v))  # (R, W, C) each
            B, T, S, mask = q.shape[0], q.shape[1], q.shape[1], segments.mask
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, S, hd)
        v = v.view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, S, hd)
        q, k, v, mask = self.positioned(q, k, v, None if same_positions else rotary, cache, mask, rows)
        p = self.dropout if self.training else 0.0
        if T == 1 and self.num_kv_heads != self.num_heads and (mask is None or mask.shape[1] == 1):
            # One query per head (decoding): the heads sharing a kv head are attention queries of
            # that head, a plain (B, nkv, group, hd) attention, many times faster on CPU than GQA.
            q = q.reshape(B, self.num_kv_heads, -1, self.head_dim)  # (B, nkv, group, hd)
            is_causal = False
        if self.by_matmuls(q, k, mask, is_causal, p):  # (short sequences at inference, as a rule)
            y = matmul_attention(q, k, v, mask, is_causal, self.scale)  # (B, nh, T, hd) | (B, nkv, group, hd)
        else:
            y = attend(q, k, v, mask, is_causal, p, self.scale)
        y = y.reshape(B, self.num_heads, T, self.head_dim)  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)  # (B, T, nh * hd)
        if segments is not None:
            y = segments.to_tokens(y)  # (1, T, nh * hd): the tokens again, for the output projection
        return call(self.o, y, None, packed, self.kernels.calibration), None

    def by_matmuls(
        self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, p: float
    ) -> bool:
        """Whether this call runs as matmul-softmax-matmul (``matmul_attention``) rather than torch's
        SDPA: at inference in float32 on CPU, without grouped-query heads, where the calibration
        timed it faster for this class of shapes (short sequences, as a rule). Training and
        dropout keep ``attend``'s paths; so does anything compiled (inductor fuses its own)."""
        if (
            p != 0.0
            or torch.is_grad_enabled()
            or q.dtype != torch.float32
            or not q.is_cpu
            or q.shape[1] != k.shape[1]
            or torch.compiler.is_compiling()
        ):
            return False
        masking = "causal" if is_causal else "none" if mask is None else "bias"  # (a float mask: added)
        if mask is not None and mask.dtype == torch.bool:
            masking = "bool"
        B, nh, T, hd = q.shape  # (B, nh, T, hd); keys (B, nh, S, hd)
        return self.kernels.calibration.attention(q.dtype, B, nh, T, k.shape[2], hd, masking) == "matmul"


def matmul_attention(
    q: torch.Tensor,  # (B, nh, T, hd)
    k: torch.Tensor,  # (B, nh, S, hd)
    v: torch.Tensor,  # (B, nh, S, hd)
    mask: torch.Tensor | None,  # bool, True = may attend, or a float bias; broadcast to (B, nh, T, S)
    is_causal: bool,
    scale: float,
) -> torch.Tensor:  # (B, nh, T, hd)
    """softmax(q k^T * scale + mask) v as two batched matrix multiplies around a softmax.

    On CPU, SDPA's flash kernel splits every (batch, head) into blocks of queries and keys and
    keeps running maxima and sums, a fixed cost per block that some short lengths do not earn
    back: on an AMD EPYC at MiniLM's (32, 12, 24, 32), one thread, SDPA took 1.70 ms (1.68 with
    padding) and this 1.35 ms (1.57), yet at 16 tokens SDPA took 0.60 ms and at 32 it was 2.6x
    faster, 3x at 128: which wins depends on the length class and the CPU, so it is timed
    (graft.kernels.calibrate). A bool mask is added as a bias (masked_fill over the scores costs
    as much as a matrix multiply); an all-masked row gives zeros, as SDPA's does. The softmax runs
    in float32, rounded to v's dtype after (as transformers' eager attention rounds a bfloat16
    model's, in a compiled decoding step).
    """
    if is_causal:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    scores = torch.matmul(q * scale, k.transpose(-2, -1))  # (B, nh, T, S)
    chosen = mask is not None and mask.dtype == torch.bool
    if chosen:  # as a bias: adding it is many times faster than masked_fill over the scores
        mask = torch.zeros(mask.shape, dtype=scores.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    if mask is not None:
        scores.add_(mask)  # (B|1, 1|nh, T|1, S) broadcast
    probs = scores.softmax(-1, dtype=torch.float32)  # (B, nh, T, S)
    if chosen:
        probs = probs.nan_to_num_(0.0)  # rows with no key to attend: 0 / 0
    return torch.matmul(probs.to(v.dtype), v)


def attend(
    q: torch.Tensor,  # (B, nh, T, hd)
    k: torch.Tensor,  # (B, nkv, S, hd)
    v: torch.Tensor,  # (B, nkv, S, hd)
    mask: torch.Tensor | None,  # bool, True = may attend, or a float bias; broadcast to (B, nh, T, S)
    is_causal: bool,
    p: float,  # attention dropout
    scale: float,
) -> torch.Tensor:  # (B, nh, T, hd)
    """softmax(q k^T * scale + mask) v, with attention dropout p.

    torch's scaled_dot_product_attention, except when dropping out on CPU: there torch falls
    back to its math path, with its slow dropout masks and both the probabilities and the
    dropped probabilities kept for backward. graft runs that math as one autograd function
    (_DroppedAttention) with its own masks (graft.kernels.dropout), keeping only q, k, v and a
    log-sum-exp per query.
    """
    gqa = k.shape[1] != q.shape[1]
    if (
        q.shape[2] <= 16
        and not gqa
        and p == 0.0
        and torch.compiler.is_compiling()
        and not torch.is_grad_enabled()
    ):
        # a compiled decoding step: the plain math (as transformers' eager attention rounds it),
        # whose mask, softmax and conversions inductor fuses around two small matrix multiplies,
        # runs faster than its call to flash attention (19 vs 22 ms a step at batch 8, SmolLM2)
        return matmul_attention(q, k, v, mask, is_causal, scale)
    if p == 0.0 or q.device.type != "cpu" or torch.compiler.is_compiling():
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=p, is_causal=is_causal, scale=scale, enable_gqa=gqa
        )
    if gqa:
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # (B, nh, S, hd)
    if is_causal:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    if mask is not None and mask.requires_grad:  # a learned bias: let autograd see it
        scores = (q * scale) @ k.transpose(-2, -1) + mask  # (B, nh, T, S)
        return dropout(scores.softmax(-1), p) @ v
    return _DroppedAttention.apply(q, k, v, mask, p, scale)


class _DroppedAttention(torch.autograd.Function):
    """dropout(softmax(q k^T * scale + mask)) v keeping, for backward, only q, k, v, one
    log-sum-exp per query and the random generator's state: as flash attention does, backward
    recomputes the (B, nh, T, S) probabilities (with one more q k^T) and draws the same dropout
    mask again, instead of keeping the probabilities twice (before and after dropout) and the
    mask, the largest activations of a training step. The scales are applied to the small
    (B, nh, T, hd) tensors rather than to the (B, nh, T, S) ones."""

    @staticmethod
    def forward(ctx, q, k, v, mask, p: float, scale: float):
        ctx.redraw = Redraw()
        keep, kept_scale = keep_mask(torch.Size((*q.shape[:3], k.shape[2])), p, q.device)  # (B, nh, T, S)
        scores = _scores(q * scale, k, mask)  # (B, nh, T, S)
        probs = scores.softmax(-1)
        # log-sum-exp from the row maximum m and the largest probability exp(m - lse)
        lse = scores.amax(-1, keepdim=True).sub_(probs.amax(-1, keepdim=True).log_())  # (B, nh, T, 1)
        del scores
        ctx.save_for_backward(q, k, v, mask, lse)
        ctx.p, ctx.scale, ctx.kept_scale = p, scale, kept_scale
        return torch.matmul(probs.mul_(keep), v * kept_scale)

    @staticmethod
    def backward(ctx, grad):  # grad: (B, nh, T, hd)
        q, k, v, mask, lse = ctx.saved_tensors
        keep = ctx.redraw.keep_mask(torch.Size((*q.shape[:3], k.shape[2])), ctx.p, q.device)  # the same mask
        scaled_q, grad = q * ctx.scale, grad * ctx.kept_scale
        probs = _scores(scaled_q, k, mask).sub_(lse).exp_()  # (B, nh, T, S)
        # softmax backward in place: probs * (g - sum(g * probs)), g the gradient of the probabilities
        grad_scores = torch.matmul(grad, v.transpose(-2, -1)).mul_(keep).mul_(probs)
        grad_scores.addcmul_(probs, grad_scores.sum(-1, keepdim=True), value=-1)
        grad_v = None
        if ctx.needs_input_grad[2]:
            grad_v = torch.matmul(probs.mul_(keep).transpose(-2, -1), grad)
        del probs
        grad_q = torch.matmul(grad_scores, k).mul_(ctx.scale) if ctx.needs_input_grad[0] else None
        grad_k = torch.matmul(grad_scores.transpose(-2, -1), scaled_q) if ctx.needs_input_grad[1] else None
        return grad_q, grad_k, grad_v, None, None, None


def _scores(scaled_q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    scores = torch.matmul(scaled_q, k.transpose(-2, -1))  # (B, nh, T, S)
    if mask is not None and mask.dtype == torch.bool:
        return scores.masked_fill_(~mask, float("-inf"))
    return scores if mask is None else scores.add_(mask)
