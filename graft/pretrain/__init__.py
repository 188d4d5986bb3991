"""Pretraining on raw text (chapter 4): masked LM, causal LM, T5 span corruption or ELECTRA over
files streamed from disk, resumable exactly; new and extended vocabularies (graft.pretrain.vocab).

run_pretrain(load_recipe("recipes/pretrain-mlm.yaml"))  # what ``graft pretrain RECIPE`` runs
"""

from graft.pretrain.run import run_pretrain
from graft.pretrain.stream import documents

__all__ = ["documents", "run_pretrain"]
