"""The transformer core (chapter 2): every piece written once and shared by every family."""

from graft.nn.attention import Attention, KVCache, build_mask
from graft.nn.block import Block
from graft.nn.config import TransformerConfig
from graft.nn.feedforward import FeedForward
from graft.nn.norm import RMSNorm
from graft.nn.positions import RelativePositionBias, Rotary, SinusoidalPositions
from graft.nn.transformer import Embeddings, Transformer, TransformerOutput

__all__ = [
    "Attention",
    "Block",
    "Embeddings",
    "FeedForward",
    "KVCache",
    "RMSNorm",
    "RelativePositionBias",
    "Rotary",
    "SinusoidalPositions",
    "Transformer",
    "TransformerConfig",
    "TransformerOutput",
    "build_mask",
]
