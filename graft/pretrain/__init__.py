"""Pretraining on raw text (chapter 4): masked or causal LM over files streamed from disk.

run_pretrain(load_recipe("recipes/pretrain-mlm.yaml"))  # what ``graft pretrain RECIPE`` runs
"""

from graft.pretrain.run import run_pretrain
from graft.pretrain.stream import documents

__all__ = ["documents", "run_pretrain"]
