"""Input embeddings: what turns a stack's inputs into vectors (chapter 2, and the vision and speech
chapters). Tokens are looked up (``graft.nn.Embeddings``); image patches (ViT, CLIP) and audio
frames (Whisper) are projected by convolutions. Every kind follows ``InputEmbeddings``, so the
blocks after it never know what the inputs were; ``TransformerConfig.inputs`` picks the kind.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from graft.nn.config import TransformerConfig
from graft.nn.init import lookup_table, normal
from graft.nn.norm import make_norm
from graft.nn.positions import timing_signal


class InputEmbeddings(nn.Module, ABC):
    """A stack's first module: its inputs -> (B, T, H) vectors.

    ``input_name``: the keyword the stack takes the inputs by, Hugging Face's name for them, so a
    processor's batch passes straight through. ``sequence_shape``: the (B, T) of the vectors
    ``forward`` will return, known before they are made (the stack makes positions and masks
    for T first). ``forward`` gets the stack's (B, T) position ids, which count on from a
    cache when decoding.
    """

    input_name = "input_ids"

    def sequence_shape(self, inputs: torch.Tensor) -> tuple[int, int]:
        return inputs.shape[0], inputs.shape[1]

    @abstractmethod
    def forward(
        self,
        inputs: torch.Tensor | None,  # input_ids (B, T), pixel_values (B, C, H, W), input_features (B, M, F)
        position_ids: torch.Tensor,  # (B, T)
        token_type_ids: torch.Tensor | None = None,  # (B, T), tokens only
        inputs_embeds: torch.Tensor | None = None,  # (B, T, E) replacing the token lookup, tokens only
    ) -> torch.Tensor:  # (B, T, H)
        ...


class PatchEmbeddings(InputEmbeddings):
    """ViT's: an image cut into square patches, each projected to a vector (one Conv2d whose stride
    is its size), a learned [CLS] vector in front (and DeiT's distillation vector after it), then
    learned positions, a norm (CLIP's pre-LayerNorm, with embedding_norm) and dropout.

    An image of another size than the config's gets its patch positions resized to its grid
    (bicubic, as transformers' ``interpolate_pos_encoding`` and timm do): the table learned for
    a 14 x 14 grid serves a 16 x 16 one.
    """

    input_name = "pixel_values"

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        h, p = cfg.hidden_size, cfg.patch_size
        self.patch_size = p
        self.grid = cfg.image_size // p  # patches a side of the images the positions were learned on
        self.prefix = cfg.prefix_tokens  # [CLS] (+ distillation) before the patches
        self.patches = nn.Conv2d(cfg.num_channels, h, kernel_size=p, stride=p, bias=cfg.patch_bias)
        self.cls = nn.Parameter(normal(h, std=0.02))
        self.distillation = nn.Parameter(normal(h, std=0.02)) if cfg.distillation_token else None
        self.positions = lookup_table(cfg.max_positions, h)  # prefix tokens + num_patches
        self.norm = make_norm(cfg) if cfg.embedding_norm else None
        self.drop = nn.Dropout(cfg.dropout)

    def sequence_shape(self, pixels: torch.Tensor) -> tuple[int, int]:
        B, _, height, width = pixels.shape
        return B, (height // self.patch_size) * (width // self.patch_size) + self.prefix

    def resized_positions(self, rows: int, cols: int) -> torch.Tensor:
        """(prefix + rows * cols, H) the position table for a grid of rows x cols patches."""
        table = self.positions.weight  # (prefix + grid * grid, H)
        if (rows, cols) == (self.grid, self.grid):
            return table
        first, grid = table[: self.prefix], table[self.prefix :]
        grid = grid.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)  # (1, H, grid, grid)
        grid = F.interpolate(
            grid, size=(rows, cols), mode="bicubic", align_corners=False
        )  # (1, H, rows, cols)
        return torch.cat([first, grid.permute(0, 2, 3, 1).flatten(0, 2)])  # (prefix + rows * cols, H)

    def forward(
        self,
        pixels: torch.Tensor,  # (B, C, height, width)
        position_ids: torch.Tensor,  # (B, prefix + N)
        token_type_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # images arrive as float32 from the processor; a bf16 model reads them in its own dtype
        x = self.patches(pixels.to(self.patches.weight.dtype))  # (B, H, rows, cols), rows = height / p
        rows, cols = x.shape[2:]
        x = x.flatten(2).transpose(1, 2)  # (B, N, H): patches row by row
        first = [self.cls] if self.distillation is None else [self.cls, self.distillation]
        first = torch.stack(first).expand(x.shape[0], -1, -1)  # (B, prefix, H)
        if (rows, cols) == (self.grid, self.grid):
            positions = self.positions(position_ids)  # (B, prefix + N, H)
        else:
            positions = F.embedding(position_ids, self.resized_positions(rows, cols))
        x = torch.cat([first, x], dim=1) + positions  # (B, prefix + N, H)
        if self.norm is not None:
            x = self.norm(x)
        return self.drop(x)


class AudioFrameEmbeddings(InputEmbeddings):
    """Whisper's: log-mel frames through two Conv1d + GELU (the second halves the frame rate),
    then fixed sinusoids (kept in the state dict, as checkpoints hold them), a norm (with
    embedding_norm) and dropout."""

    input_name = "input_features"

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.conv1 = nn.Conv1d(cfg.num_mel_bins, h, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(h, h, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positions", timing_signal(cfg.max_positions, h))  # (P, H)
        self.norm = make_norm(cfg) if cfg.embedding_norm else None
        self.drop = nn.Dropout(cfg.dropout)

    def sequence_shape(self, features: torch.Tensor) -> tuple[int, int]:
        return features.shape[0], (features.shape[2] + 1) // 2  # conv2: stride 2, padding 1

    def forward(
        self,
        features: torch.Tensor,  # (B, M, F): M mel bins, F frames
        position_ids: torch.Tensor,  # (B, T), T = ceil(F / 2)
        token_type_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = F.gelu(self.conv1(features))  # (B, H, F)
        x = F.gelu(self.conv2(x))  # (B, H, T)
        x = x.transpose(1, 2) + self.positions[position_ids]  # (B, T, H)
        if self.norm is not None:
            x = self.norm(x)
        return self.drop(x)
