"""The transformer core (chapter 2): every piece written once and shared by every family."""

from graft.nn.attention import Attention, KVCache, build_mask
from graft.nn.block import Block
from graft.nn.config import EncoderDecoderConfig, TransformerConfig
from graft.nn.dual_encoder import DualEncoder, DualEncoderConfig, DualEncoderOutput
from graft.nn.embeddings import AudioFrameEmbeddings, InputEmbeddings, PatchEmbeddings
from graft.nn.encoder_decoder import EncoderDecoder, Seq2SeqOutput
from graft.nn.feedforward import FeedForward
from graft.nn.norm import RMSNorm
from graft.nn.positions import RelativePositionBias, Rotary, SinusoidalPositions
from graft.nn.transformer import Embeddings, Transformer, TransformerOutput

__all__ = [
    "Attention",
    "AudioFrameEmbeddings",
    "Block",
    "DualEncoder",
    "DualEncoderConfig",
    "DualEncoderOutput",
    "Embeddings",
    "EncoderDecoder",
    "EncoderDecoderConfig",
    "FeedForward",
    "InputEmbeddings",
    "KVCache",
    "PatchEmbeddings",
    "RMSNorm",
    "RelativePositionBias",
    "Rotary",
    "Seq2SeqOutput",
    "SinusoidalPositions",
    "Transformer",
    "TransformerConfig",
    "TransformerOutput",
    "build_mask",
]
