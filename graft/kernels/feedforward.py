"""The feed-forward's CPU kernels: activations applied by oneDNN to the tile in cache, and gate
and up as one matrix multiply while the weights are frozen."""

import torch

from graft.kernels.linear import call, fused, plain
from graft.nn.feedforward import ACTIVATIONS, FeedForward


class FastFeedForward(FeedForward):
    """graft.nn.FeedForward on graft's CPU kernels."""

    kernels = None  # the model's Kernels, set by graft.kernels.optimize

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, T, H)
        packed, routes = self.kernels.packed(), self.kernels.calibration
        if self.gate is None:
            h = call(self.up, x, self.activation, packed, routes)  # (B, T, I)
        elif packed is not None and plain(self.gate) and plain(self.up):  # one matrix multiply for both
            gate, up = fused(x, (self.gate, self.up), (self, "gate_up"), packed, routes)  # (B, T, I) each
            h = ACTIVATIONS[self.activation](gate) * up
        else:
            h = call(self.gate, x, self.activation, packed, routes) * call(self.up, x, None, packed, routes)
        return call(self.down, h, None, packed, routes)
