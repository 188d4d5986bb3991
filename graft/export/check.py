"""Parity at export: the exported graph against graft's own eager model, on shapes not traced.

The graph was traced on 2 rows of 7 tokens; it is checked on 3 rows of 11 (two of them padded)
and 1 row of 5, through graft's ordinary forward (the 2-D mask, the eager model's branches).
A decoder is checked on a prompt (an empty past) and then one step fed the prompt's cache; an
encoder-decoder's encoder graph on a padded batch (its cross keys and values against those graft's
decoder keeps in its cache), and its decoder graph on 3 start tokens and then one step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

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

TRACE_SHAPE = (2, 7)  # (batch, sequence) of the example the exporters trace
CHECK_SHAPES = ((3, 11), (1, 5))  # not the traced shape; rows 2 and 3 of the first are padded
FP32_TOLERANCE = 1e-4

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


def agreement(run: Runner, reference: Runner, cases: list[Case]) -> dict[str, float]:
    """How close a quantized graph stays to its float one: the lowest cosine similarity of a row of
    the first output, and the share of rows whose argmax agrees (real tokens only)."""
    cosines, same, rows = [], 0, 0
    for case in cases:
        inputs = numpy_inputs(case.inputs)
        a = np.asarray(run(inputs)[0], dtype=np.float32)
        b = np.asarray(reference(inputs)[0], dtype=np.float32)
        if case.real is not None and a.ndim >= 3:
            a, b = a[case.real.numpy()], b[case.real.numpy()]
        a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        cosines.extend((a * b).sum(1) / np.maximum(norms, 1e-12))
        same += int((a.argmax(1) == b.argmax(1)).sum())
        rows += a.shape[0]
    return {"min_cosine": float(min(cosines)), "argmax_agreement": same / rows}
