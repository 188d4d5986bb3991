"""Looking inside a model (chapters 6 and 9): attributions, attention, faithfulness, probes, fairness.

    from graft.interpret import subject, attribute
    s = subject(model, tokenizer, "A fine film.")      # the input and the target explained
    a = attribute(s, "ig", steps=50)                  # one score per token (and IG's delta)

Head importance (``graft.interpret.heads``) is shared with pruning.
"""

from graft.interpret.attention import attention_maps, attention_scores, rollout
from graft.interpret.attributions import METHODS, Attribution, attribute
from graft.interpret.subject import Subject, from_ids, subject

__all__ = [
    "METHODS",
    "Attribution",
    "Subject",
    "attention_maps",
    "attention_scores",
    "attribute",
    "from_ids",
    "rollout",
    "subject",
]
