"""The feed-forward's CPU kernels: activations applied by oneDNN to the tile in cache, gate and up
as one matrix multiply while the weights are frozen, and int8-dynamic rows taken in chunks, the
middle (bias, activation, quantizing the rows for down) in one C pass."""

import torch

from graft.kernels.int8 import Int8Linear, activated_rows
from graft.kernels.linear import call, fused, plain
from graft.nn.feedforward import ACTIVATIONS, FeedForward

# int8-dynamic: rows go through the feed-forward in chunks whose intermediate activations take at
# most this many bytes per thread. Its passes outside the matrix multiply (dequantize, GELU,
# quantize the rows again for down) read and write the (rows, intermediate) tensor several times:
# MiniLM at batch 32 x 128 tokens, (4096, 1536) fp32, is 25 MB, out of cache, and its forward took
# 186 ms on 2 threads of an AMD EPYC in one piece, 152-165 ms in chunks of 1024-2048 rows. fp32
# and bf16 apply the activation inside oneDNN's product and gain nothing from chunks.
CHUNK_BYTES = 3 * 2**20


class FastFeedForward(FeedForward):
    """graft.nn.FeedForward on graft's CPU kernels."""

    kernels = None  # the model's Kernels, set by graft.kernels.optimize

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, T, H)
        rows = self.chunk_rows(x)
        if rows is None:
            return self.rows_forward(x)
        flat = x.reshape(-1, x.shape[-1])  # (B*T, H)
        return torch.cat([self.rows_forward(chunk) for chunk in flat.split(rows)]).view(*x.shape[:-1], -1)

    def chunk_rows(self, x: torch.Tensor) -> int | None:
        """Rows per chunk when int8-dynamic rows are better taken in chunks, else None."""
        if not (isinstance(self.up, Int8Linear) and self.up.activations == "dynamic") or x.requires_grad:
            return None
        rows = max(64, CHUNK_BYTES * torch.get_num_threads() // (self.up.out_features * 4))
        return rows if x.numel() // x.shape[-1] > rows else None

    def int8_rows(self, x: torch.Tensor) -> bool:
        """Up and down both plain int8-dynamic layers (no gate) over fp32 rows on oneDNN: the
        activation's output is only ever read quantized, so it is never kept in float."""
        return (
            self.gate is None
            and x.dtype == torch.float32
            and all(
                type(m) is Int8Linear and not (m._forward_hooks or m._forward_pre_hooks) and m.onednn_rows(x)
                for m in (self.up, self.down)
            )
        )

    def rows_forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., H) -> (..., H)
        packed, routes = self.kernels.packed(), self.kernels.calibration
        if self.int8_rows(x):
            q, scale = self.up.rows.quantize(x, self.up.in_features)  # (N, H) uint8, (N, 1)
            h, h_scale = activated_rows(
                self.up.product(q), scale, self.up.bias, self.activation
            )  # (N, I) uint8
            return self.down.rows_output(h, h_scale).view(*x.shape[:-1], -1)
        if self.gate is None:
            h = call(self.up, x, self.activation, packed, routes)  # (..., I)
        elif packed is not None and plain(self.gate) and plain(self.up):  # one matrix multiply for both
            gate, up = fused(x, (self.gate, self.up), (self, "gate_up"), packed, routes)  # (..., I) each
            h = ACTIVATIONS[self.activation](gate) * up
        else:
            h = call(self.gate, x, self.activation, packed, routes) * call(self.up, x, None, packed, routes)
        return call(self.down, h, None, packed, routes)
