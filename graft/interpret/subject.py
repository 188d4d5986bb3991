"""What an explanation explains: one input, one number the model computes from it.

A ``Subject`` is a tokenized input (one row) and a target: a class of a classifier, a tag of one
token, the start or end of a QA answer, the next token of a language model. ``Subject.scores``
turns a batch of variants of the input (other token ids, or other token embeddings) into that
number for each: the target's probability (a sigmoid for multi-label, the value for
regression). Every method of graft.interpret (attributions, occlusion, faithfulness curves)
reads the model through it, so each task is handled once, here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from graft.errors import GraftError, did_you_mean
from graft.tasks import TaskModel

TASKS = ("classification", "token-classification", "question-answering", "causal-lm")


@dataclass
class Subject:
    """One input row and the number explained: ``scores(ids)`` (N,) for N variants of the row."""

    model: TaskModel
    batch: dict[str, torch.Tensor]  # (1, T) input_ids, attention_mask, position_ids (, token_type_ids)
    tokens: list[str]  # T readable pieces
    fixed: list[bool]  # T: special tokens, never attributed, removed or occluded
    label: str  # the target, as the user names it
    index: int  # class, tag, token id; for QA 0 (start) or 1 (end)
    position: int | None  # the position the target is read at (token tags, QA, the LM's last token)
    baseline_id: int  # the token that stands for "nothing here" (IG's baseline, deletion, occlusion)

    @property
    def input_ids(self) -> torch.Tensor:
        return self.batch["input_ids"]  # (1, T)

    @property
    def baseline_ids(self) -> torch.Tensor:
        """(1, T) the input with every token that is not special replaced by the baseline token."""
        fixed = torch.tensor(self.fixed, device=self.input_ids.device)
        return torch.where(fixed, self.input_ids, torch.full_like(self.input_ids, self.baseline_id))

    @property
    def free(self) -> list[int]:
        """Positions an explanation may move: every token that is not special."""
        return [i for i, f in enumerate(self.fixed) if not f]

    def query(self) -> list[int]:
        """The positions whose outputs the target reads (whose attention rows matter)."""
        if self.position is not None:
            return [self.position]
        head = self.model.head
        pooling = getattr(head, "pooling", "cls")
        T = self.input_ids.shape[1]
        if pooling == "mean":
            return list(range(T))
        return [T - 1] if pooling == "last" else [0]

    def scores(self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """(N,) the explained number for N variants: ids (N, T), optionally their embeddings (N, T, E)."""
        n = input_ids.shape[0]
        batch = {k: v.expand(n, -1) for k, v in self.batch.items()}
        batch["input_ids"] = input_ids
        if inputs_embeds is not None:
            batch["inputs_embeds"] = inputs_embeds
        task = self.model.task
        if task == "causal-lm":
            batch["logits_to_keep"] = 1
        logits = self.model(**batch).logits.float()
        if task == "classification":
            kind = self.model.head.problem_type
            if kind == "regression":
                return logits[:, self.index]
            if kind == "multi_label":
                return logits[:, self.index].sigmoid()
            return logits.softmax(-1)[:, self.index]  # (N,)
        if task == "token-classification":
            return logits[:, self.position].softmax(-1)[:, self.index]
        if task == "question-answering":  # the start (or end) of the answer among all positions
            return logits[..., self.index].softmax(-1)[:, self.position]
        return logits[:, -1].softmax(-1)[:, self.index]  # causal-lm: the next token

    @torch.no_grad()
    def score(self) -> float:
        return float(self.scores(self.input_ids)[0])


def token_embedding(model: nn.Module) -> nn.Embedding:
    """The token lookup of a model's body: where attributions are computed (and where IG interpolates)."""
    tokens = getattr(getattr(model, "body", model).embed, "tokens", None)
    if not isinstance(tokens, nn.Embedding):
        raise GraftError(
            "explain: this model's embeddings have no token lookup (a prompt-tuned or non-text model); "
            "explain the base model"
        )
    return tokens


def check_task(model: Any, what: str = "explain") -> TaskModel:
    if not isinstance(model, TaskModel):
        raise GraftError(f"{what}: a bare model has no task head; give a task model ({', '.join(TASKS)})")
    if model.task not in TASKS:
        raise GraftError(f"{what}: the {model.task} task is not supported (supported: {', '.join(TASKS)})")
    return model


def subject(
    model: TaskModel,
    tokenizer: Any,
    text: str,
    context: str | None = None,
    target: str | None = None,
    position: int | None = None,
    max_length: int | None = None,
) -> Subject:
    """The subject for ``text`` (and, for QA, ``context``; ``text`` is then the question).

    ``target``: a class or tag name (classification, token classification), ``start`` or ``end``
    (QA), the next token as text (causal LM); default: what the model predicts. ``position``:
    the token index whose tag is explained (token classification; default: the most confident
    token not tagged O).
    """
    from graft.tasks.collate import model_inputs, window

    model = check_task(model)
    task, cfg = model.task, model.config
    if task == "question-answering" and context is None:
        raise GraftError(
            "explain: a question-answering model needs --context (the passage; --text is the question)"
        )
    if task != "question-answering" and context is not None:
        raise GraftError(f"explain: --context is for question answering; this is a {task} model")
    if not text.strip():
        raise GraftError("explain: --text is empty")
    limit = window(cfg, tokenizer, max_length)
    enc = tokenizer.encode(text, context, max_length=limit, truncation="only_second" if context else True)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in model_inputs(enc, cfg).items()}
    tokens = [t if t is not None else "" for t in tokenizer.convert_ids_to_tokens(enc.input_ids[0])]
    fixed = [bool(s) for s in enc.special_tokens_mask[0]]
    # QA: the answer is looked for in the passage only (sequence 1); every token may be attributed
    answers = [i for i, seq in enumerate(enc.sequence_ids[0]) if seq == 1] if context else None
    return from_ids(
        model, batch, tokens, fixed, baseline_token(tokenizer), target, position, tokenizer, answers
    )


def baseline_token(tokenizer: Any) -> int:
    """The pad token (IG's usual reference), else eos, unk, 0."""
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


@torch.no_grad()
def from_ids(
    model: TaskModel,
    batch: dict[str, torch.Tensor],
    tokens: list[str],
    fixed: list[bool],
    baseline_id: int,
    target: str | None = None,
    position: int | None = None,
    tokenizer: Any = None,
    answers: list[int] | None = None,
) -> Subject:
    """The subject of an already tokenized row (``batch``: (1, T) tensors); ``answers``: QA's
    passage positions (default: every token that is not special)."""
    model = check_task(model)
    model.eval()
    task = model.task
    T = batch["input_ids"].shape[1]
    batch = dict(batch)
    batch.setdefault("attention_mask", torch.ones_like(batch["input_ids"]))
    # positions fixed from the real ids: IG's baseline (pad ids) must not move RoBERTa's positions
    batch["position_ids"] = model.body.position_ids(batch["input_ids"], 0, (1, T))
    free = [i for i, f in enumerate(fixed) if not f]
    if position is not None and not 0 <= position < T:
        raise GraftError(f"explain: --position {position} is outside the text's {T} tokens (0..{T - 1})")
    batch_call = dict(batch)
    if task == "causal-lm":
        batch_call["logits_to_keep"] = 1
    logits = model(**batch_call).logits.float()[0]  # (C,), (T, C), (T, 2) or (1, V)
    if task == "classification":
        names = model.head.id2label
        index = pick(target, names, int(logits.argmax()), "--target")
        return Subject(model, batch, tokens, fixed, names[index], index, None, baseline_id)
    if task == "token-classification":
        names = model.head.id2label
        probs = logits.softmax(-1)  # (T, C)
        if position is None:
            candidates = [i for i in free if names[int(probs[i].argmax())] != "O"] or free or [0]
            position = max(candidates, key=lambda i: float(probs[i].max()))
        index = pick(target, names, int(probs[position].argmax()), "--target")
        return Subject(model, batch, tokens, fixed, names[index], index, position, baseline_id)
    if task == "question-answering":
        index = pick(target or "start", ["start", "end"], 0, "--target")
        allowed = torch.zeros(T, dtype=torch.bool, device=logits.device)
        allowed[answers if answers is not None else free] = True
        best = int(logits[:, index].masked_fill(~allowed, float("-inf")).argmax())
        position = best if position is None else position
        return Subject(model, batch, tokens, fixed, ["start", "end"][index], index, position, baseline_id)
    # causal LM: the next token (the text's most likely continuation by default)
    if target is None:
        index = int(logits[-1].argmax())
    else:
        ids = tokenizer.encode(target, add_special_tokens=False, return_tensors=None).input_ids[0]
        if len(ids) != 1:
            raise GraftError(
                f"explain: --target {target!r} is {len(ids)} tokens; give one token of the vocabulary"
            )
        index = ids[0]
    label = tokenizer.decode([index]) if tokenizer is not None else str(index)
    return Subject(model, batch, tokens, fixed, label, index, T - 1, baseline_id)


def pick(name: str | None, names: list[str], default: int, flag: str) -> int:
    if name is None:
        return default
    if name in names:
        return names.index(name)
    raise GraftError(f"explain: {flag} {name!r} is not one of {', '.join(names)}{did_you_mean(name, names)}")
