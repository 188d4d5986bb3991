"""Zero-shot classification of texts, no training: a sentence encoder or a causal LM names the class.

Two ways (chapter 4, prompt-based learning):

- a sentence encoder: each text's cosine similarity to each label's description, embedded
  (graft.tasks.zeroshot.label_embeddings, the same prompt ensembling as CLIP's);
- a causal LM: each label's verbalizer (a word or a few) scored after a prompt, as the sum of the
  log-likelihoods of its tokens, then calibrated for the model's prior over the labels (Zhao et
  al. 2021, contextual calibration): the label probabilities given content-free inputs ("N/A",
  "", "[MASK]"), averaged, divide those given a real input. A model that answers "sport" to
  anything no longer wins by answering "sport".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from graft import kernels
from graft.errors import GraftError, did_you_mean
from graft.tasks.collate import pad

DEFAULT_TEMPLATE = "Text: {text}\nTopic:"  # a causal LM's prompt; the verbalizer follows after a space
CONTENT_FREE = ("N/A", "", "[MASK]")  # Zhao et al.'s content-free inputs


def label_texts(
    labels: Sequence[str], given: Sequence[str] | None, option: str, what: str, every: bool = True
) -> list[str]:
    """Each label's text from ``LABEL=TEXT`` pairs (``option``: the flag's name), or the label itself
    when none are given. Given ones name each label once and no other; with ``every`` (verbalizers)
    they must cover every label, else a label without one stands for itself (descriptions)."""
    if not given:
        return list(labels)
    texts: dict[str, str] = {}
    for pair in given:
        label, sep, text = pair.partition("=")
        label = label.strip()
        if not sep or not label or not text.strip():
            raise GraftError(f"{option} {pair!r}: expected LABEL={what.upper()}, e.g. {labels[0]}=...")
        if label not in labels:
            raise GraftError(
                f"{option} {pair!r}: {label!r} is not one of --labels{did_you_mean(label, labels)}"
            )
        if label in texts:
            raise GraftError(f"{option}: label {label!r} is given twice")
        texts[label] = text.strip()
    missing = [label for label in labels if label not in texts]
    if missing and every:
        raise GraftError(f"{option}: label {missing[0]!r} has no {what} (add {option} {missing[0]}=...)")
    return [texts.get(label, label) for label in labels]


def check_template(template: str, option: str = "--template") -> None:
    if template.count("{text}") != 1:
        raise GraftError(
            f"{option} {template!r}: must hold the input's place once as {{text}} "
            '(e.g. "Text: {text}\\nTopic:")'
        )


def check_chat_template(tokenizer: Any, what: str = "zeroshot --chat") -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise GraftError(
            f"{what}: the tokenizer has no chat template (tokenizer_config.json chat_template); "
            "use a chat model (e.g. SmolLM2-135M-Instruct)"
        )


def clip_text(tokenizer: Any, text: str, max_tokens: int | None) -> str:
    """``text`` cut to its first ``max_tokens`` tokens (a long article in a prompt)."""
    if not max_tokens:
        return text
    ids = tokenizer.encode(
        text, max_length=max_tokens, padding=False, add_special_tokens=False, return_tensors=None
    ).input_ids[0]
    return tokenizer.decode(ids, skip_special_tokens=True)


def token_ids(tokenizer: Any, text: str, special: bool) -> list[int]:
    return tokenizer.encode(
        text, truncation=False, padding=False, add_special_tokens=special, return_tensors=None
    ).input_ids[0]


def verbalizer_ids(tokenizer: Any, verbalizers: Sequence[str]) -> list[list[int]]:
    """The tokens of each verbalizer as it follows a prompt: after a space, no special tokens."""
    ids = [token_ids(tokenizer, " " + v, special=False) for v in verbalizers]
    empty = [v for v, row in zip(verbalizers, ids, strict=True) if not row]
    if empty:
        raise GraftError(f"zero-shot: verbalizer {empty[0]!r} has no tokens")
    return ids


@torch.inference_mode()
def continuation_scores(
    model: Any,
    prompts: Sequence[list[int]],
    continuations: Sequence[list[int]],
    batch_size: int = 8,
    pad_id: int = 0,
) -> torch.Tensor:  # -> (N, L)
    """(N, L) log p(continuation j | prompt i), the sum over the continuation's tokens, for a causal
    LM (a TaskModel with the causal-lm head). When every continuation is one token, one row per
    prompt gives all of them; otherwise each (prompt, continuation) is a row. Rows are padded on
    the right, so positions and attention are those of the row alone; the body computes the last
    block only at the positions that predict a continuation token (``rows``)."""
    L = len(continuations)
    single = all(len(c) == 1 for c in continuations)
    if single:
        items = [(i, None) for i in range(len(prompts))]
    else:
        items = [(i, j) for i in range(len(prompts)) for j in range(L)]
    scores = torch.zeros(len(prompts), L)
    with kernels.frozen(model):
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            rows = [prompts[i] + ([] if j is None else continuations[j]) for i, j in chunk]
            ids, mask = pad(rows, pad_id)  # (B, T) on the right
            K = 1 if single else max(len(c) for c in continuations)
            # the position predicting continuation token k is (prompt length - 1 + k)
            where = torch.tensor([[len(prompts[i]) - 1 + min(k, 0 if j is None else len(continuations[j]) - 1)
                                   for k in range(K)] for i, j in chunk])  # fmt: skip
            out = model.body(ids, mask, rows=where)  # last_hidden_state: (B, K, H)
            logprobs = model.head.proj(out.last_hidden_state).float().log_softmax(-1)  # (B, K, V)
            for b, (i, j) in enumerate(chunk):
                if j is None:  # every label's one token at the prompt's last position
                    scores[i] = logprobs[b, 0, [c[0] for c in continuations]]
                else:
                    c = continuations[j]
                    scores[i, j] = logprobs[b, torch.arange(len(c)), c].sum()
    return scores


def calibrate(scores: torch.Tensor, content_free: torch.Tensor) -> torch.Tensor:
    """(N, L) contextual calibration (Zhao et al. 2021): log q = log p - log p_cf, where p is an
    input's label distribution (scores softmaxed over the labels) and p_cf the mean distribution
    over the content-free inputs' rows (C, L); i.e. W = diag(p_cf)^-1, b = 0, then renormalized."""
    p_cf = content_free.float().softmax(-1).mean(0)  # (L,)
    return (scores.float().log_softmax(-1) - p_cf.log()).log_softmax(-1)


def causal_lm_scores(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    verbalizers: Sequence[str],
    template: str = DEFAULT_TEMPLATE,
    calibrated: bool = True,
    max_tokens: int | None = None,
    batch_size: int = 8,
    chat: bool = False,
) -> torch.Tensor:  # -> (N, L)
    """(N, L) a causal LM's label scores for each text: the verbalizers' summed log-likelihoods after
    the prompt ``template`` (``{text}``: the text, cut to ``max_tokens`` tokens), calibrated.
    ``chat``: the prompt is a user message in the model's chat template and the verbalizer the
    assistant's reply."""
    check_template(template)
    if chat:
        check_chat_template(tokenizer)
        continuations = [token_ids(tokenizer, v, special=False) for v in verbalizers]  # no leading space
    else:
        continuations = verbalizer_ids(tokenizer, verbalizers)

    def prompt_ids(text: str) -> list[int]:
        prompt = template.replace("{text}", text)
        if chat:
            messages = [{"role": "user", "content": prompt}]
            return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return token_ids(tokenizer, prompt, special=True)

    prompts = [prompt_ids(clip_text(tokenizer, t, max_tokens)) for t in texts]
    pad_id = tokenizer.pad_token_id or 0
    scores = continuation_scores(model, prompts, continuations, batch_size, pad_id)
    if not calibrated:
        return scores
    free = continuation_scores(
        model, [prompt_ids(t) for t in CONTENT_FREE], continuations, batch_size, pad_id
    )
    return calibrate(scores, free)


def encoder_scores(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    descriptions: Sequence[str],
    templates: Sequence[str] = ("{}",),
    max_length: int | None = None,
    batch_size: int = 64,
) -> torch.Tensor:  # -> (N, L)
    """(N, L) a sentence encoder's cosine similarity of each text to each label's description."""
    from graft.tasks.embedding import embed
    from graft.tasks.zeroshot import classify, label_embeddings

    def encode(batch: list[str]) -> torch.Tensor:
        return embed(model, tokenizer, batch, batch_size=batch_size, max_length=max_length, normalize=True)

    return classify(encode(list(texts)), label_embeddings(encode, descriptions, templates))


def text_model_kind(family: Any, model: str) -> str:
    """'causal-lm' or 'encoder' for text zero-shot, or a one-line error for a model it cannot use."""
    if family.decoder:
        return "causal-lm"
    if family.encoder_decoder or family.dual_encoder or family.inputs != "tokens":
        raise GraftError(
            f"zeroshot --text: {model} is a {family.name} model; texts need a sentence encoder "
            "(BERT-like, e.g. all-MiniLM-L6-v2) or a causal LM (GPT-2, Llama)"
        )
    return "encoder"
