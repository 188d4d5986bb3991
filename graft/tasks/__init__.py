"""Task heads (chapter 5): each written once and shared by every family."""

from graft.tasks.base import Head, TaskModel, TaskOutput
from graft.tasks.causal_lm import LMHead

# task name -> head class; a head is built from the body it sits on.
HEADS: dict[str, type[Head]] = {LMHead.task: LMHead}

__all__ = ["HEADS", "Head", "LMHead", "TaskModel", "TaskOutput"]
