"""--int8's check: a label head judged by argmax agreement on real rows (--check-data), anything else
(and a label head without real rows) by every row's cosine to float32; the figures in the manifest;
a refusal writes nothing and says what it measured and which flag changes the bound."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import transformers
from test_export import book_texts
from test_predict_cli import LABELS, task_folder, write_jsonl

from graft.export import MANIFEST
from graft.export.check import Case, agreement


def fixed(output: np.ndarray):
    """A runner that gives ``output`` whatever it is fed."""
    return lambda inputs: [output]


def one_case(real: torch.Tensor | None = None) -> list[Case]:
    return [Case({"input_ids": torch.zeros(1, 1, dtype=torch.long)}, [], real)]


def softmax(x: np.ndarray) -> np.ndarray:
    return torch.tensor(x, dtype=torch.float64).softmax(-1).numpy()


def test_a_classifier_is_judged_by_its_argmax_and_the_probabilities_it_moves():
    reference = np.array(
        [[2.0, 0.0, -1.0], [0.1, 0.2, 0.0], [0.0, 3.0, 1.0], [1.0, 1.1, 0.0]], dtype=np.float32
    )
    quantized = reference.copy()
    quantized[3] = [1.2, 1.1, 0.0]  # row 3's argmax moves from label 1 to 0
    figures = agreement(fixed(quantized), fixed(reference), one_case(), "classification")
    assert figures["argmax_agreement"] == 0.75 and figures["rows"] == 4
    shift = 0.5 * np.abs(softmax(quantized) - softmax(reference)).sum(1)
    assert figures["max_probability_shift"] == pytest.approx(shift.max(), abs=1e-7)
    cosine = torch.nn.functional.cosine_similarity(torch.tensor(quantized), torch.tensor(reference))
    assert figures["min_cosine"] == pytest.approx(cosine.min().item(), abs=1e-6)


def test_a_tagger_is_judged_on_real_tokens_and_a_qa_model_on_start_and_end_over_them():
    real = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)  # 6 real tokens
    tags = np.random.default_rng(0).normal(size=(2, 4, 3)).astype(np.float32)
    moved = tags.copy()
    moved[1, 3] = [9.0, -9.0, -9.0]  # padding: never counted
    moved[0, 1] = tags[0, 1, ::-1]  # one real token's scores reversed
    figures = agreement(fixed(moved), fixed(tags), one_case(real), "token-classification")
    assert figures["rows"] == 6
    assert figures["argmax_agreement"] == (5 + int(tags[0, 1].argmax() == tags[0, 1, ::-1].argmax())) / 6

    spans = np.zeros((2, 4, 2), dtype=np.float32)  # (B, T, start/end)
    spans[0, 2], spans[1, 1] = [5.0, 4.0], [3.0, 6.0]
    padded = spans.copy()
    padded[1, 3] = [50.0, 50.0]  # the largest score, on a padding position: not an answer
    figures = agreement(fixed(padded), fixed(spans), one_case(real), "question-answering")
    assert figures == {**figures, "rows": 4, "argmax_agreement": 1.0, "max_probability_shift": 0.0}
    padded[0, 3, 1] = 60.0  # row 0's end moves to a real position
    assert (
        agreement(fixed(padded), fixed(spans), one_case(real), "question-answering")["argmax_agreement"]
        == 0.75
    )


def test_a_multi_label_head_agrees_on_the_set_of_labels_it_turns_on():
    reference = np.array([[1.0, -1.0, 0.5], [-2.0, 0.3, 0.2]], dtype=np.float32)
    quantized = np.array([[1.0, -1.0, 0.5], [-2.0, -0.1, 0.2]], dtype=np.float32)  # row 1's label 1 turns off
    figures = agreement(fixed(quantized), fixed(reference), one_case(), "classification", multi_label=True)
    assert figures["argmax_agreement"] == 0.5
    sigmoid = torch.sigmoid(torch.tensor(quantized, dtype=torch.float64)) - torch.sigmoid(
        torch.tensor(reference, dtype=torch.float64)
    )
    assert figures["max_probability_shift"] == pytest.approx(sigmoid.abs().max().item(), abs=1e-9)


@pytest.fixture
def classifier(tmp_path, minilm):
    return task_folder(
        tmp_path, minilm, transformers.AutoModelForSequenceClassification, id2label=dict(enumerate(LABELS))
    )


def texts_file(tmp_path, n: int = 32):
    return write_jsonl(
        tmp_path / "check.jsonl", [{"text": t, "label": "ignored"} for t in book_texts(n // 2)]
    )


def on_the_fence(folder, data) -> None:
    """Move a classifier's decision boundary into the middle of ``data``'s rows: a random tiny model
    gives every text nearly the same logits (margins -0.0233 +- 1e-4), so the boundary through their
    median leaves rows on both sides within int8's noise of it."""
    from graft.loading import load_model
    from graft.tokenizer import Tokenizer

    records = [{"text": json.loads(line)["text"]} for line in data.read_text().splitlines()]
    model = load_model(folder)
    batch = model.head.collate(records, Tokenizer.from_folder(folder), None)
    with torch.no_grad():
        logits = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}).logits
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(folder)
    with torch.no_grad():
        hf.classifier.bias[1] -= (logits[:, 1] - logits[:, 0]).median()
    hf.save_pretrained(folder)


def test_check_data_figures_land_in_the_manifest_and_a_higher_bound_refuses_with_them(
    tmp_path, classifier, cli
):
    """The figures are measured again here, on the same rows (one batch of 32: int8 quantizes each
    batch's activations with one scale, so the batch is part of the measurement)."""
    import onnxruntime as ort

    from graft.loading import load_model
    from graft.tokenizer import Tokenizer

    data = texts_file(tmp_path)
    on_the_fence(classifier, data)
    out, plain = tmp_path / "int8", tmp_path / "fp32"
    result = cli("export", classifier, out, "--int8", "--check-data", data, "--min-agreement", "0").ok()
    cli("export", classifier, plain).ok()
    int8 = json.loads((out / MANIFEST).read_text())["int8"]

    records = [{"text": json.loads(line)["text"]} for line in data.read_text().splitlines()]  # no labels
    batch = load_model(classifier).head.collate(records, Tokenizer.from_folder(classifier), None)
    feed = {k: batch[k].numpy() for k in ("input_ids", "attention_mask", "token_type_ids")}
    q, f = (ort.InferenceSession(str(d / "model.onnx")).run(None, feed)[0] for d in (out, plain))  # (32, 2)
    cosine = (q * f).sum(1) / np.linalg.norm(q, axis=1) / np.linalg.norm(f, axis=1)
    assert int8["check_data"] == f"--check-data {data}" and int8["rows"] == len(records)
    assert int8["float32_nodes"] == 0  # judged by its decisions on real rows: quantized whole (onnx.py)
    assert int8["argmax_agreement"] == (q.argmax(1) == f.argmax(1)).mean()
    assert int8["min_cosine"] == pytest.approx(cosine.min(), abs=1e-6)
    assert int8["max_probability_shift"] == pytest.approx(
        (0.5 * np.abs(softmax(q) - softmax(f)).sum(1)).max(), abs=1e-6
    )
    said = (
        f"argmax agreement {int8['argmax_agreement']:.4f} >= 0 on 32 rows of --check-data {data} "
        f"(min cosine {int8['min_cosine']:.4f}, max probability shift {int8['max_probability_shift']:.3f})"
    )
    assert int8["checked"] == said and result.stderr.splitlines()[-1] == f"int8: {said}"

    assert int8["argmax_agreement"] < 1  # rows on the fence: int8 moves some (measured: 11 of 32 kept)
    refused = cli(
        "export", classifier, tmp_path / "no", "--int8", "--check-data", data, "--min-agreement", "1"
    )
    assert refused.error_line() == (
        f"error: export: int8 check failed: argmax agreement {int8['argmax_agreement']:.4f} < 1 on 32 rows "
        f"of --check-data {data} (min cosine {int8['min_cosine']:.4f}, max probability shift "
        f"{int8['max_probability_shift']:.3f}); lower --min-agreement to accept it, or export without "
        "--int8; nothing was written"
    )
    assert not (tmp_path / "no").exists()


def test_a_label_head_without_check_data_is_checked_by_cosine_and_says_so(tmp_path, classifier, cli):
    out = tmp_path / "out"
    result = cli("export", classifier, out, "--int8", "--min-cosine", "0").ok()
    int8 = json.loads((out / MANIFEST).read_text())["int8"]
    said = (
        f"min cosine to float32 {int8['min_cosine']:.4f} >= 0 on 4 random-token rows; argmax agreement "
        "on real texts needs --check-data FILE"
    )
    assert int8["check_data"] is None and int8["rows"] == 4 and int8["checked"] == said
    assert int8["float32_nodes"] == 2  # judged by cosine: blocks 0 and 1's down projections stay float32
    assert result.stderr.splitlines()[-1] == f"int8: {said}"
    line = cli("export", classifier, tmp_path / "no", "--int8", "--min-cosine", "1").error_line()
    assert re.fullmatch(
        r"error: export: int8 check failed: min cosine to float32 (0\.\d{4}|1\.0000) < 1 on 4 random-token "
        r"rows; give --check-data FILE \(texts like the model's\) to judge it by argmax agreement instead, "
        r"lower --min-cosine, or export without --int8; nothing was written",
        line,
    ), line
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("problem", ["missing", "no text", "empty", "bad json"])
def test_a_bad_check_data_file_is_one_line_naming_it(problem, tmp_path, classifier, cli):
    data = tmp_path / "check.jsonl"
    if problem == "no text":
        write_jsonl(data, [{"body": "A fine film."}])
    elif problem == "empty":
        data.write_text("")
    elif problem == "bad json":
        data.write_text('{"text": "fine"}\n{"text": \n')
    line = cli("export", classifier, tmp_path / "out", "--int8", "--check-data", data).error_line()
    if problem == "no text":  # the reader's own line, as graft predict gives it, with its --column hint
        assert line.startswith(f"error: {data}, line 1, column 'text': no input column (looked for 'text', ")
        assert line.endswith(
            "available: 'body'); name it with --column COL=text (data.columns: {COL: text} in a recipe)"
        )
    else:
        assert (
            line
            == {
                "missing": f"error: --check-data {data}: no such file or folder",
                "empty": f"error: {data}, line 1: empty file (0 bytes)",
                "bad json": f"error: {data}, line 2, char 1: malformed JSON (Expecting value)",
            }[problem]
        )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--check-data", "x.jsonl"], "--check-data judges the --int8 graph: add --int8"),
        (["--min-cosine", "0.9"], "--min-cosine judges the --int8 graph: add --int8"),
        (["--int8", "--column", "body=text"], "--column names --check-data's columns: add --check-data FILE"),
        (
            ["--int8", "--min-agreement", "0.9"],
            "--min-agreement is argmax agreement on --check-data's rows: add --check-data FILE (without it, "
            "--min-cosine bounds every random-token row's cosine)",
        ),
    ],
)
def test_int8_check_flags_without_what_they_judge_are_one_line(args, message, tmp_path, classifier, cli):
    assert cli("export", classifier, tmp_path / "out", *args).error_line() == f"error: {message}"


def test_check_data_for_a_model_it_cannot_check_is_one_line(tmp_path, minilm, cli):
    folder = task_folder(tmp_path, minilm, transformers.AutoModelForCausalLM, family="llama")
    data = texts_file(tmp_path, 4)
    assert cli("export", folder, tmp_path / "out", "--int8", "--check-data", data).error_line() == (
        "error: --check-data: int8 causal-lm models are checked on random-token rows (--check-data "
        "is for classification, token-classification, question-answering, embedding models)"
    )


def test_min_agreement_for_a_model_judged_by_cosine_is_one_line(tmp_path, minilm, cli):
    data = texts_file(tmp_path, 4)
    args = ["--task", "embedding", "--int8", "--check-data", data, "--min-agreement", "0.9"]
    assert cli("export", minilm, tmp_path / "out", *args).error_line() == (
        "error: --min-agreement: int8 embedding models are judged by cosine (--min-cosine), not argmax agreement"
    )


def test_compress_checks_its_int8_export_on_the_test_records(tmp_path, classifier):
    """graft compress --onnx exports int8 judged as --check-data judges it: by argmax agreement on the
    records it evaluates every variant on, not by cosine on 4 random-token rows (which can refuse a
    well-trained classifier whose decisions int8 keeps)."""
    from graft.compress.compare import exported
    from graft.tokenizer import Tokenizer

    records = [{"text": t, "label": LABELS[i % 2]} for i, t in enumerate(book_texts(10))]
    exported(classifier, tmp_path / "onnx-int8", Tokenizer.from_folder(classifier), True, records)
    int8 = json.loads((tmp_path / "onnx-int8" / MANIFEST).read_text())["int8"]
    assert int8["check_data"] == "the --data records" and int8["rows"] == len(records) == 20
    assert int8["checked"].startswith("argmax agreement ")
    assert int8["checked"].endswith(
        f"on 20 rows of the --data records (min cosine {int8['min_cosine']:.4f}, "
        f"max probability shift {int8['max_probability_shift']:.3f})"
    )
    assert int8["float32_nodes"] == 0  # judged by decisions: quantized whole, as export --check-data does


def test_int8_drops_the_quantizers_pre_processing_note_and_nothing_else(tmp_path, caplog):
    """ONNX Runtime's quantize_dynamic logs "Please consider to run pre-processing before quantization"
    through the root logger on every call; graft drops that one record (graft/export/onnx.py says why)
    while it quantizes, and leaves the root logger as it was."""
    import logging

    from test_export import tiny_model

    from graft.export.graph import graph_for
    from graft.export.onnx import DEFAULT_OPSET, export_onnx, not_the_preprocessing_hint, quantize_int8

    graph = graph_for(tiny_model("bert", "classification", tmp_path))
    export_onnx(graph, tmp_path / "plain.onnx", DEFAULT_OPSET)
    with caplog.at_level(logging.WARNING):
        quantize_int8(tmp_path / "plain.onnx", tmp_path / "int8.onnx")
        logging.warning("Please consider to run pre-processing: said after quantize_int8, so kept")
    assert (tmp_path / "int8.onnx").stat().st_size > 0
    assert [r.getMessage() for r in caplog.records if "pre-processing" in r.getMessage()] == [
        "Please consider to run pre-processing: said after quantize_int8, so kept"
    ]
    assert not_the_preprocessing_hint not in logging.getLogger().filters
