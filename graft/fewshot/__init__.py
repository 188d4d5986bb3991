"""Few labels, or none (chapters 4, 10): zero-shot scoring, in-context learning, SetFit, the transfer curve.

``verbalizer``: zero-shot text classification by a sentence encoder's similarity to label
descriptions or a causal LM's calibrated verbalizer likelihoods; ``icl``: k examples per class in a
chat model's prompt, the answer scored over the labels; ``setfit``: contrastive fine-tuning of a
sentence encoder on pairs, then a logistic-regression head; ``curve``: test accuracy against
labelled examples per class for each method (``graft curve``).
"""

from graft.fewshot.icl import icl_scores
from graft.fewshot.setfit import SetFit, pairs, train_setfit
from graft.fewshot.verbalizer import calibrate, causal_lm_scores, continuation_scores, encoder_scores

__all__ = [
    "SetFit",
    "calibrate",
    "causal_lm_scores",
    "continuation_scores",
    "encoder_scores",
    "icl_scores",
    "pairs",
    "train_setfit",
]
