"""Parity at export: the exported graph against graft's own eager model, on shapes not traced.

The graph was traced on 2 rows of 7 tokens; it is checked on 3 rows of 11 (two of them padded)
and 1 row of 5, through graft's ordinary forward (the 2-D mask, the eager model's branches).
A decoder is checked on a prompt (an empty past) and then one step fed the prompt's cache; an
encoder-decoder's encoder graph on a padded batch (its cross keys and values against those graft's
decoder keeps in its cache), and its decoder graph on 3 start tokens and then one step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from graft.errors import GraftError
from graft.export.graph import (
    PER_TOKEN,
    DecoderGraph,
    EncoderGraph,
    Graph,
    Seq2SeqDecoderGraph,
    TaskGraph,
    TowerGraph,
    example_inputs,
    typed,
)
from graft.nn import KVCache, Transformer
from graft.tasks import TaskModel

TRACE_SHAPE = (2, 7)  # (batch, sequence) of the example the exporters trace
CHECK_SHAPES = ((3, 11), (1, 5))  # not the traced shape; rows 2 and 3 of the first are padded
FP32_TOLERANCE = 1e-4
# --int8 is checked by the int8 graph's outputs against the float32 graph's, row by row. A label
# head (LABEL_TASKS) is judged by its decisions on real rows (--check-data): the share of rows whose
# argmax is kept. Everything else, and a label head without real rows, by direction: every row's
# cosine. Why not cosine for a label head: a well-trained BBC MiniLM classifier's 5 logits on the
# random-token rows gave min cosine 0.954-0.967, while on 200 real BBC texts int8 kept 98.5% of
# its argmaxes (its accuracy too: 0.980 for float32 and int8 on the 444 test articles).
LABEL_TASKS = ("classification", "token-classification", "question-answering", "image-classification")
INT8_MIN_AGREEMENT = 0.97  # bounds the accuracy change on those rows by 3 points
INT8_MIN_COSINE = 0.99
CHECK_DATA_TASKS = ("classification", "token-classification", "question-answering", "embedding")

Runner = Callable[[dict[str, np.ndarray]], list[np.ndarray]]


@dataclass
class Case:
    inputs: dict[str, torch.Tensor]
    expected: list[torch.Tensor]  # graft eager's outputs, in the graph's output order
    real: torch.Tensor | None  # (B, T) bool: the query positions compared in per-token outputs


BF16_TOLERANCE = 1e-2  # bfloat16 keeps 8 bits of mantissa: 2 steps of it at magnitude 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def numpy_inputs(inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """numpy has no bfloat16: floats go as float32 (exact), as the graphs' interface takes them."""
    return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in inputs.items()}


@torch.inference_mode()
def task_cases(graph: TaskGraph) -> list[Case]:
    model, cases = graph.model, []
    dtype = next(graph.parameters()).dtype
    for batch, length in CHECK_SHAPES:
        inputs = example_inputs(graph, batch, length, seed=1)
        if isinstance(model, Transformer):
            out = model(**typed(inputs, dtype)).last_hidden_state
        else:
            out = model(**typed(inputs, dtype)).logits
        mask = inputs.get("attention_mask")  # images have none: every patch is real
        real = mask.bool() if graph.task in PER_TOKEN and mask is not None else None
        cases.append(Case(inputs, [out], real))
    return cases


@torch.inference_mode()
def decoder_cases(graph: DecoderGraph) -> list[Case]:
    """A left-padded prompt (empty past), then one new token per row fed graft's cache of that prompt."""
    model, layers = graph.model, graph.layers
    batch, length = CHECK_SHAPES[0]
    prompt = example_inputs(graph, batch, length, seed=1)
    ids, mask, positions = prompt["input_ids"], prompt["attention_mask"], prompt["position_ids"]
    cache = KVCache(layers, capacity=length + 1)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache).logits
    present = [t[:, :, :length].clone() for i in range(layers) for t in (cache.keys[i], cache.values[i])]
    first = Case(prompt, [logits, *present], mask.bool())

    token = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
    mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], dim=1)  # (B, T + 1)
    step = {"input_ids": token, "attention_mask": mask, "position_ids": positions[:, -1:] + 1}
    step.update({name: t for name, t in zip(graph.input_names()[3:], present, strict=True)})
    logits = model(
        input_ids=token, attention_mask=mask, position_ids=step["position_ids"], cache=cache
    ).logits
    after = [t[:, :, : length + 1] for i in range(layers) for t in (cache.keys[i], cache.values[i])]
    return [first, Case(step, [logits, *after], torch.ones(batch, 1, dtype=torch.bool))]


@torch.inference_mode()
def seq2seq_cases(encoder: EncoderGraph, decoder: Seq2SeqDecoderGraph) -> dict[str, list[Case]]:
    """A padded source through graft's encoder, then 3 start tokens (an empty past) and one step
    through its decoder with its own cache: what each graph must give on the same inputs."""
    model, body, layers = encoder.model, encoder.body, encoder.layers
    batch, length = CHECK_SHAPES[0]
    source = example_inputs(encoder, batch, length, seed=1)
    encoded = body.encode(**typed(source, next(body.parameters()).dtype))
    mask = source.get("attention_mask")  # (B, S); Whisper's windows have none
    cache = body.new_cache(capacity=4)
    g = torch.Generator().manual_seed(2)
    start = torch.randint(
        min(4, decoder.config.vocab_size - 1), decoder.config.vocab_size, (batch, 3), generator=g
    )

    def run(ids: torch.Tensor) -> torch.Tensor:
        out = model(attention_mask=mask, decoder_input_ids=ids, encoder_outputs=encoded, cache=cache)
        return out.logits if decoder.task == "seq2seq" else out.last_hidden_state  # (B, T, V|H)

    def presents(n: int) -> list[torch.Tensor]:
        return [t[:, :, :n].clone() for i in range(layers) for t in (cache.keys[i], cache.values[i])]

    first = run(start)
    cross = [t for i in range(layers) for t in (cache.cross_keys[i], cache.cross_values[i])]
    real = mask.bool() if mask is not None else None
    encoder_case = Case(source, [encoded.last_hidden_state, *cross], real)
    names = decoder.input_names()
    given = {"encoder_attention_mask": mask} if mask is not None else {}
    given.update(zip([n for n in names if n.startswith("cross.")], cross, strict=True))
    past = dict(zip([n for n in names if n.startswith("past_key_values.")], presents(0), strict=True))
    prompt = Case({"decoder_input_ids": start, **given, **past}, [first, *presents(3)], None)
    token = first[:, -1].argmax(-1, keepdim=True) if decoder.task == "seq2seq" else start[:, :1]  # (B, 1)
    step_past = dict(zip(past, presents(3), strict=True))
    step = Case({"decoder_input_ids": token, **given, **step_past}, [run(token), *presents(4)], None)
    return {"encoder": [encoder_case], "decoder": [prompt, step]}


@torch.inference_mode()
def tower_cases(graph: TowerGraph) -> list[Case]:
    """A dual encoder's graph against graft's encode_text / encode_image (and their similarity)."""
    from graft.tasks.image_text import similarity

    body, cases = graph.body, []
    dtype = next(body.parameters()).dtype
    for batch, length in CHECK_SHAPES:
        inputs = example_inputs(graph, batch, length, seed=1)
        text = (
            body.encode_text(inputs["input_ids"], inputs["attention_mask"]) if "input_ids" in inputs else None
        )
        image = body.encode_image(inputs["pixel_values"].to(dtype)) if "pixel_values" in inputs else None
        if text is not None and image is not None:
            cases.append(Case(inputs, [similarity(image, text, body.logit_scale)], None))  # (N, M)
        else:
            cases.append(Case(inputs, [text if text is not None else image], None))  # (B, P)
    return cases


def parity_cases(graphs: dict[str, Graph]) -> dict[str, list[Case]]:
    """The cases each graph of an export is checked on, by graph name."""
    if "text" in graphs:
        return {name: tower_cases(graph) for name, graph in graphs.items()}
    if "encoder" in graphs:
        return seq2seq_cases(graphs["encoder"], graphs["decoder"])
    graph = graphs["model"]
    return {"model": decoder_cases(graph) if isinstance(graph, DecoderGraph) else task_cases(graph)}


def max_abs_diff(run: Runner, cases: list[Case]) -> float:
    """The largest |graph - graft| over every case and output (per-token outputs on real tokens)."""
    worst = 0.0
    for case in cases:
        got = run(numpy_inputs(case.inputs))
        for i, (value, expected) in enumerate(zip(got, case.expected, strict=True)):
            value, expected = np.asarray(value, dtype=np.float32), expected.float().numpy()
            if i == 0 and case.real is not None and value.ndim >= 3:  # (B, T, ...) on real tokens
                value, expected = value[case.real.numpy()], expected[case.real.numpy()]
            worst = max(worst, float(np.abs(value - expected).max()))
    return worst


def decision_rows(output: np.ndarray, real: np.ndarray | None, task: str) -> list[np.ndarray]:
    """The rows of scores a model decides by, each array (rows, choices): a classifier's (B, L)
    logits, a tagger's (real tokens, L), a QA model's start and end logits over each row's real
    tokens (2, T_real): its answer's first and last token are the argmax over positions."""
    if task == "question-answering":
        return [row[keep].T for row, keep in zip(output, real, strict=True)]  # (2, T_real) each
    if real is not None and output.ndim >= 3:
        output = output[real]  # (real tokens, ...)
    return [output.reshape(-1, output.shape[-1])]


def probabilities(logits: np.ndarray, multi_label: bool) -> np.ndarray:
    """(rows, choices) logits -> probabilities: a softmax over the choices, or (multi-label) a
    sigmoid each."""
    x = logits.astype(np.float64)
    if multi_label:
        return 1 / (1 + np.exp(-x))
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def probability_shift(x: np.ndarray, y: np.ndarray, multi_label: bool) -> float:
    """How far (rows, choices) logits ``x`` move a row's probabilities from ``y``'s, at the most: the
    total-variation distance (half the L1 distance of the softmaxes), or one label's sigmoid."""
    moved = np.abs(probabilities(x, multi_label) - probabilities(y, multi_label))
    return float(moved.max() if multi_label else 0.5 * moved.sum(1).max())


def agreement(
    run: Runner, reference: Runner, cases: list[Case], task: str = "base", multi_label: bool = False
) -> dict[str, float]:
    """How close a quantized graph stays to its float one on the first output, row by row (real
    tokens only): the lowest cosine similarity and the share of rows whose argmax agrees; for a
    label head (LABEL_TASKS) the rows it decides by (decision_rows) and the largest total-variation
    distance between their probabilities. A multi-label head agrees on a row when the same labels
    are on (logit > 0), and its distance is the largest change of one label's probability."""
    label = task in LABEL_TASKS
    cosines, same, rows, moved = [], 0, 0, 0.0
    for case in cases:
        inputs = numpy_inputs(case.inputs)
        a = np.asarray(run(inputs)[0], dtype=np.float32)
        b = np.asarray(reference(inputs)[0], dtype=np.float32)
        real = case.real.numpy() if case.real is not None else None
        kind = task if label else "base"  # an embedding's or a hidden state's rows as they are
        for x, y in zip(decision_rows(a, real, kind), decision_rows(b, real, kind), strict=True):
            norms = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
            cosines.extend((x * y).sum(1) / np.maximum(norms, 1e-12))
            if multi_label:
                same += int(((x > 0) == (y > 0)).all(1).sum())
            else:
                same += int((x.argmax(1) == y.argmax(1)).sum())
            if label:
                moved = max(moved, probability_shift(x, y, multi_label))
            rows += x.shape[0]
    figures = {"min_cosine": float(min(cosines)), "argmax_agreement": same / rows, "rows": rows}
    return {**figures, "max_probability_shift": moved} if label else figures


def record_cases(
    model: TaskModel, tokenizer: Any, records: Iterable[dict[str, Any]], where: str, batch_size: int = 32
) -> list[Case]:
    """Real rows for the int8 check (``graft export --check-data``): ``records`` collated by the
    model's head as ``graft predict`` collates them (inputs only: the int8 graph is compared with
    the float32 one, not with graft). A record the head cannot read is a GraftError naming ``where``."""
    from graft.tasks.predict import batches

    cases = []
    for chunk in batches(records, batch_size):  # a reader's errors name their file and line already
        try:
            batch = model.head.collate(chunk, tokenizer, None)
        except GraftError as e:  # "record 3: no 'text'...": in which file
            raise GraftError(f"{where}: {e}") from None
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        real = inputs["attention_mask"].bool() if model.task in PER_TOKEN else None
        cases.append(Case(inputs, [], real))
    if not cases:
        raise GraftError(f"{where}: no records")
    return cases


@dataclass
class Int8Check:
    """What --int8's graph must keep of the float32 graph's outputs, and on which rows."""

    min_agreement: float = INT8_MIN_AGREEMENT  # a label head on real rows: the share of argmaxes kept
    min_cosine: float = INT8_MIN_COSINE  # everything else: every row's cosine to float32
    data: str | None = None  # where real rows come from ("--check-data FILE"); None: random-token rows
    cases: list[Case] | None = None  # those rows (record_cases); None: the parity check's


def check_int8_data(task: str, check: Int8Check) -> None:
    """Refuse, in one line, real rows for a model whose int8 graph cannot be checked on them."""
    if check.data is not None and task not in CHECK_DATA_TASKS:
        raise GraftError(
            f"--check-data: int8 {task} models are checked on random-token rows "
            f"(--check-data is for {', '.join(CHECK_DATA_TASKS)} models)"
        )


def int8_verdict(figures: dict[str, float], task: str, check: Int8Check, multi_label: bool = False) -> str:
    """One line saying what the int8 check measured, on which rows, against what bound; a GraftError
    with the figures and the flag that changes the bound when the int8 graph falls short of it."""
    on = (
        f"{figures['rows']} rows of {check.data}"
        if check.cases is not None
        else f"{figures['rows']} random-token rows"
    )
    if task in LABEL_TASKS and check.cases is not None:
        kept, wanted = figures["argmax_agreement"], check.min_agreement
        what = "label-set agreement" if multi_label else "argmax agreement"
        ok = kept >= wanted
        said = (
            f"{what} {kept:.4f} {'>=' if ok else '<'} {wanted:g} on {on} (min cosine {figures['min_cosine']:.4f}, "
            f"max probability shift {figures['max_probability_shift']:.3f})"
        )
        if not ok:
            raise GraftError(
                f"export: int8 check failed: {said}; lower --min-agreement to accept it, or export "
                "without --int8; nothing was written"
            )
        return said
    cosine, wanted = figures["min_cosine"], check.min_cosine
    ok = cosine >= wanted  # NaN fails
    said = f"min cosine to float32 {cosine:.4f} {'>=' if ok else '<'} {wanted:g} on {on}"
    if task in LABEL_TASKS:  # no real rows: what was not checked, and how to check it
        if not ok:
            raise GraftError(
                f"export: int8 check failed: {said}; give --check-data FILE (texts like the model's) to "
                "judge it by argmax agreement instead, lower --min-cosine, or export without --int8; "
                "nothing was written"
            )
        return said + "; argmax agreement on real texts needs --check-data FILE"
    if not ok:
        raise GraftError(
            f"export: int8 check failed: {said}; lower --min-cosine to accept it, or export without "
            "--int8; nothing was written"
        )
    return said
