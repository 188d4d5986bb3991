"""POST /explain and the playground's explain view: the numbers of ``graft explain`` for the same text
and method (over HTTP, within 1e-5: both round scores to 6 decimals), and in headless chromium the
tokens shown and their colours ranked as graft explain ranks the tokens."""

from __future__ import annotations

import json
import os
from itertools import pairwise
from pathlib import Path

import pytest
import transformers
from test_predict_cli import LABELS, TAGS, task_folder
from test_serve import Server

from graft.interpret.render import readable, shade

TEXT = "Shahin Siadati wrote a fine book in Tehran."
TOL = 1e-5


def graft_explain(cli, folder, tmp_path, method: str, *args: str) -> dict:
    out = tmp_path / f"explained-{method}"
    cli("explain", folder, "--text", TEXT, "--method", method, "--out", out, *args).ok()
    return json.loads((out / "explanation.json").read_text())


def same_explanation(got: dict, want: dict, method: str) -> None:
    for key in ("task", "target", "position", "tokens", "special"):
        assert got[key] == want[key], key
    assert got["score"] == pytest.approx(want["score"], abs=TOL)
    assert got["methods"][method]["scores"] == pytest.approx(want["methods"][method]["scores"], abs=TOL)
    if method == "ig":  # captum's convergence delta, the same computation
        assert got["methods"]["ig"]["delta"] == pytest.approx(want["methods"]["ig"]["delta"], abs=TOL)


@pytest.mark.parametrize(
    ("cls", "labels"),
    [
        (transformers.AutoModelForSequenceClassification, LABELS),
        (transformers.AutoModelForTokenClassification, TAGS),
    ],
)
def test_explain_equals_graft_explain(tmp_path, minilm, cli, cls, labels):
    folder = task_folder(tmp_path, minilm, cls, id2label=dict(enumerate(labels)))
    methods = ("grad-x-input", "ig")
    want = {m: graft_explain(cli, folder, tmp_path, m) for m in methods}
    other = labels[1] if want["ig"]["target"] == labels[0] else labels[0]
    want_other = graft_explain(cli, folder, tmp_path, "grad-x-input", "--target", other, "--position", "2")
    server = Server(folder, log=tmp_path / "serve.log")
    try:
        c = server.client
        assert c.post("/predict", json={"inputs": TEXT}).status_code == 200  # a batched forward first
        got = {m: c.post("/explain", json={"text": TEXT, "method": m}).json() for m in methods}
        got_other = c.post(
            "/explain", json={"text": TEXT, "target": other, "position": 2}
        ).json()  # grad x input by default
        bad = [
            c.post("/explain", json={"text": TEXT, "target": "nope"}),
            c.post("/explain", json={"text": TEXT, "method": "shap"}),
            c.post("/explain", json={"text": "  "}),
            c.post("/explain", json={"text": TEXT, "context": "a passage"}),
        ]
        assert c.get("/info").json()["explain"] is True
    finally:
        server.close()
    for m in methods:
        same_explanation(got[m], want[m], m)
    same_explanation(got_other, want_other, "grad-x-input")
    at = (
        ""
        if cls is transformers.AutoModelForSequenceClassification
        else f" at token 2 ({want_other['tokens'][2]})"
    )
    assert got_other["caption"] == f"target {other!r}{at}"
    task = want["ig"]["task"]
    assert [(r.status_code, r.json()["error"]["message"]) for r in bad] == [
        (422, f"explain: target 'nope' is not one of {', '.join(labels)}"),
        (422, "method: Input should be 'grad-x-input', 'ig', 'occlusion', 'attention' or 'rollout'"),
        (422, "explain: text is empty"),
        (422, f"explain: context is for question answering; this is a {task} model"),
    ]


def test_explain_is_refused_where_it_cannot_run(tmp_path, minilm):
    server = Server(minilm, log=tmp_path / "serve.log")
    try:
        r = server.client.post("/explain", json={"text": TEXT})
        assert server.client.get("/info").json()["explain"] is False
    finally:
        server.close()
    assert (r.status_code, r.json()["error"]["message"]) == (
        400,
        "/explain serves classification, token-classification, question-answering models; "
        "for this base model run graft explain",
    )


def artifact(tmp_path: Path, name: str) -> Path:
    """Where a screenshot goes: $GRAFT_ARTIFACTS when set (pytest keeps only 3 sessions of tmp folders)."""
    folder = Path(os.environ.get("GRAFT_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def colour(style: str) -> tuple[int, int, int]:
    """'rgb(r, g, b)' as the browser reports a computed background."""
    return tuple(int(v) for v in style.removeprefix("rgb(").removesuffix(")").split(","))


def signed(rgb: tuple[int, int, int]) -> int:
    """How strongly a token is coloured: green (positive) up, red (negative) down."""
    r, g, _ = rgb
    return 255 - r if g == 255 else g - 255


@pytest.mark.parametrize("method", ["grad-x-input", "ig"])
def test_playground_colours_the_tokens_as_graft_explain_ranks_them(tmp_path, minilm, cli, page, method):
    folder = task_folder(
        tmp_path, minilm, transformers.AutoModelForSequenceClassification, id2label=dict(enumerate(LABELS))
    )
    want = graft_explain(cli, folder, tmp_path, method)
    server = Server(folder, log=tmp_path / "serve.log")
    try:
        page.goto(server.url + "/")
        page.wait_for_selector("body[data-task=classification]")
        page.fill("#text", TEXT)
        page.select_option("#method", method)
        page.click("#explain")
        page.wait_for_selector("#explained[data-ready=true]")
        page.screenshot(path=str(artifact(tmp_path, f"explain-{method}.png")))
        spans = page.query_selector_all("#tokens .token")
        shown = [s.inner_text() for s in spans]
        colours = [colour(s.evaluate("e => getComputedStyle(e).backgroundColor")) for s in spans]
        special = [s.get_attribute("class") == "token special" for s in spans]
        caption = page.inner_text("#explain-caption")
    finally:
        server.close()
    scores = want["methods"][method]["scores"]
    assert shown == [readable(t) for t in want["tokens"]] and special == want["special"]
    assert caption.startswith(f"{method}: target {want['target']!r} (score ")
    # the colours graft explain's terminal view gives (one step of 255 apart at most: the server's
    # scores are within 1e-5 of these), and the tokens ranked by colour as by attribution
    scale = max(abs(s) for s in scores)
    for got, s in zip(colours, scores, strict=True):
        assert max(abs(a - b) for a, b in zip(got, shade(s, scale), strict=True)) <= 1, (got, s)
    ranked = sorted(range(len(scores)), key=lambda i: scores[i])
    strengths = [signed(colours[i]) for i in ranked]
    assert all(a <= b + 1 for a, b in pairwise(strengths)), strengths
    assert max(map(abs, strengths)) == 255  # the strongest token in full colour
