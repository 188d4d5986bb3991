"""Model families (chapter 3): each maps a Hugging Face config and weight names onto graft's core."""

from graft.models import albert, bart, bert, clip, distilbert, gpt2, llama, t5, vit, whisper  # noqa: F401  (registers the families)
from graft.models.registry import FAMILIES, Family, family_for

__all__ = ["FAMILIES", "Family", "family_for"]
