"""Task heads (chapter 5): each written once and shared by every family.

``HEADS[task](body, **options)`` builds a head; ``TaskModel(body, head)`` is the model. Each task
module also holds the task's collation (records -> batch) and post-processing (logits ->
predictions), as methods of its head.
"""

from graft.tasks.base import Head, TaskModel, TaskOutput
from graft.tasks.causal_lm import LMHead
from graft.tasks.classification import ClassificationHead
from graft.tasks.embedding import EmbeddingHead
from graft.tasks.image import ImageClassificationHead
from graft.tasks.image_text import ImageTextHead
from graft.tasks.masked_lm import MaskedLMHead
from graft.tasks.question_answering import QuestionAnsweringHead
from graft.tasks.seq2seq import Seq2SeqHead
from graft.tasks.token_classification import TokenClassificationHead

# task name -> head class; a head is built from the body it sits on.
HEADS: dict[str, type[Head]] = {
    head.task: head
    for head in (
        LMHead,
        MaskedLMHead,
        ClassificationHead,
        TokenClassificationHead,
        QuestionAnsweringHead,
        EmbeddingHead,
        ImageClassificationHead,
        Seq2SeqHead,
        ImageTextHead,
    )
}

__all__ = [
    "HEADS",
    "ClassificationHead",
    "EmbeddingHead",
    "Head",
    "ImageClassificationHead",
    "ImageTextHead",
    "LMHead",
    "MaskedLMHead",
    "QuestionAnsweringHead",
    "Seq2SeqHead",
    "TaskModel",
    "TaskOutput",
    "TokenClassificationHead",
]
