"""Dual encoders (CLIP): a text stack and an image stack that embed into one space (chapter 9).

Each tower is a plain ``Transformer``; a bias-free projection maps its pooled vector (the text's
end-of-text token, the image's [CLS]) into the shared space, and a learned temperature
(``logit_scale``, kept as its log) scales the cosine similarities of the two. Nothing joins the
towers before the similarity: an image is embedded once and compared with any number of texts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from graft.errors import GraftError
from graft.nn.config import TransformerConfig
from graft.nn.transformer import Transformer


@dataclass
class DualEncoderConfig:
    """A text tower, an image tower and the space they project into."""

    family: str
    text: TransformerConfig  # causal over tokens, final norm (CLIP)
    vision: TransformerConfig  # inputs="patches"; its final norm is CLIP's post-LayerNorm on [CLS]
    projection_dim: int
    logit_scale_init: float = 2.6592  # log(1 / 0.07), CLIP's initial temperature
    # the text is pooled at its first eos_token_id; None (or CLIP's old configs' 2): at its highest id,
    # which is the end-of-text token in CLIP's vocabulary (as transformers reads those configs)
    eos_token_id: int | None = None
    # how a text is pooled: "eos" (CLIP: its end-of-text token) or "mean" of its real tokens (a
    # sentence encoder as the text tower, LiT-style: all-MiniLM-L6-v2 was trained with mean pooling)
    text_pooling: str = "eos"
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.text_pooling not in ("eos", "mean"):
            raise GraftError(f"config: text_pooling={self.text_pooling!r} is not one of eos, mean")
        if self.text.inputs != "tokens" or self.vision.inputs != "patches":
            raise GraftError(
                f"config: a dual encoder needs text.inputs='tokens' and vision.inputs='patches', not "
                f"{self.text.inputs!r} and {self.vision.inputs!r}"
            )

    @property
    def pooler(self) -> bool:  # the towers pool without a pooler layer
        return False

    @property
    def inputs(self) -> str:
        return "image-text"


@dataclass
class DualEncoderOutput:
    text_embeds: torch.Tensor | None = None  # (B, P) projected, not normalized (as transformers')
    image_embeds: torch.Tensor | None = None  # (B', P)
    logit_scale: torch.Tensor | None = None  # () the log of the temperature the similarities are scaled by


class DualEncoder(nn.Module):
    """CLIP's body: ``encode_text`` and ``encode_image`` -> (B, P) vectors in the shared space."""

    def __init__(self, cfg: DualEncoderConfig) -> None:
        super().__init__()
        self.config = cfg
        self.text = Transformer(cfg.text)
        self.vision = Transformer(cfg.vision)
        self.text_projection = nn.Linear(cfg.text.hidden_size, cfg.projection_dim, bias=False)
        self.visual_projection = nn.Linear(cfg.vision.hidden_size, cfg.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale_init)))

    @property
    def towers(self) -> dict[str, Transformer]:
        """The two stacks by name (as their parameters are prefixed): what strategies walk."""
        return {"text": self.text, "vision": self.vision}

    def eos_positions(self, input_ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, 1)
        """Where each text is pooled: its first end-of-text token (position 0 when it has none,
        as transformers); with no usable eos id, its highest token id (CLIP's end-of-text)."""
        eos = self.config.eos_token_id
        if eos is None or eos == 2:
            return input_ids.argmax(-1, keepdim=True)
        return (input_ids == eos).int().argmax(-1, keepdim=True)

    def encode_text(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, T), 1 = real token
        position_ids: torch.Tensor | None = None,  # (B, T)
    ) -> torch.Tensor:  # (B, P)
        return self.text_projection(self.pool_text(input_ids, attention_mask, position_ids))  # (B, P)

    def pool_text(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, T)
        position_ids: torch.Tensor | None = None,  # (B, T)
    ) -> torch.Tensor:  # (B, H) the text tower's vector of each text, before the projection
        if self.config.text_pooling == "mean":
            hidden = self.text(
                input_ids, attention_mask, position_ids=position_ids
            ).last_hidden_state  # (B, T, H)
            if attention_mask is None:
                return hidden.mean(1)
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        rows = self.eos_positions(input_ids)  # (B, 1): the last block computes only this row
        out = self.text(input_ids, attention_mask, position_ids=position_ids, rows=rows)
        return out.last_hidden_state[:, 0]

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, P)
        cls = torch.zeros(pixel_values.shape[0], 1, dtype=torch.long, device=pixel_values.device)  # (B, 1)
        out = self.vision(pixel_values=pixel_values, rows=cls)  # post-LN on [CLS] only
        return self.visual_projection(out.last_hidden_state[:, 0])  # (B, H) -> (B, P)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, T)
        pixel_values: torch.Tensor | None = None,  # (B', C, H, W)
        position_ids: torch.Tensor | None = None,  # (B, T)
    ) -> DualEncoderOutput:
        """The texts' and the images' embeddings (either may be absent)."""
        text = self.encode_text(input_ids, attention_mask, position_ids) if input_ids is not None else None
        image = self.encode_image(pixel_values) if pixel_values is not None else None
        return DualEncoderOutput(text, image, self.logit_scale)
