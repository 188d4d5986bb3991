"""What every task's collation shares: the model's window, its input tensors, record fields."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

from graft.errors import GraftError
from graft.nn import TransformerConfig

LABEL_KEYS = ("label", "tags", "answers")  # the record keys that hold what a model should predict
LABELLED = {
    "classification": "label",
    "token-classification": "tags",
    "question-answering": "answers",
    "seq2seq": "text_pair",
}


def record_options(head: Any, labelled: bool) -> dict[str, Any]:
    """How to read a file of records for ``head``: ``load_records``' keyword arguments.

    ``graft predict`` (labelled=False) reads no labels at all, so a label column the model has
    never seen does no harm. ``graft eval`` (labelled=True) needs the labels, and checks each
    class label against the model's as it reads, so a bad one is named by file and line.
    """
    problem = getattr(head, "problem_type", "")
    label_kind = {"multi_label": "multi", "regression": "float"}.get(problem, "class")
    if not labelled:
        return {"label_kind": label_kind, "ignore": LABEL_KEYS}
    key = LABELLED.get(head.task)
    checked = key in ("label", "tags") and problem != "regression"
    return {
        "label_kind": label_kind,
        "required": (key,) if key else (),
        "labels": list(head.id2label) if checked else None,
    }


def to_device(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """The batch with its tensors on ``device`` (other values as they are)."""
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }


def window(cfg: TransformerConfig, tokenizer: Any, max_length: int | None = None) -> int:
    """How many tokens a row may hold: the smallest of max_length, the tokenizer's and the model's limits."""
    # RoBERTa numbers positions from pad_token_id + 1, BART's table from row 2: rows the text cannot use
    positions = cfg.max_positions - cfg.first_position
    limits = [positions, max_length, getattr(tokenizer, "model_max_length", None)]
    return min(n for n in limits if n)


def model_inputs(enc: Any, cfg: TransformerConfig) -> dict[str, torch.Tensor]:
    """The tensors of an encoded batch that the body reads."""
    inputs = {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}
    if cfg.type_vocab_size:  # families without segment embeddings get none (GPT-2 would misread them)
        inputs["token_type_ids"] = enc.token_type_ids
    return inputs


def pad(
    rows: Sequence[Sequence[int]], value: int, side: Literal["right", "left"] = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (ids, mask), each (B, T_max), filled with ``value`` on ``side``.

    Right for training and encoders; left for generation, so that every row's last token sits in
    the last column, where the next token is appended.
    """
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        start = width - len(r) if side == "left" else 0
        ids[i, start : start + len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, start : start + len(r)] = 1
    return ids, mask


def where(record: dict[str, Any], index: int) -> str:
    """How an error names a record: its id when it has one, else its position."""
    return f"record {record['id']!r}" if record.get("id") is not None else f"record {index + 1}"


def field(records: list[dict[str, Any]], key: str, task: str) -> list[Any]:
    """``record[key]`` of every record, or a GraftError naming the first record without it."""
    values = []
    for i, record in enumerate(records):
        if record.get(key) is None:
            raise GraftError(
                f"{where(record, i)}: no {key!r}, which the {task} task needs (keys: {', '.join(record)})"
            )
        values.append(record[key])
    return values


def has_all(records: list[dict[str, Any]], key: str) -> bool:
    return all(record.get(key) is not None for record in records)
