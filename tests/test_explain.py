"""graft.interpret's attributions, attention and faithfulness, and ``graft explain``.

The references: captum's LayerIntegratedGradients run directly on transformers' model of the same
weights, transformers' eager attention probabilities, and hand computations.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from conftest import hf_model, padded_batch, tiny_hf_config

from graft.errors import GraftError
from graft.interpret import attention_maps, attribute, from_ids, rollout, subject
from graft.interpret.faithfulness import BINS, area, curves, faithfulness, ranking
from graft.interpret.subject import TASKS
from graft.loading import load_model
from graft.models import FAMILIES
from graft.tasks import HEADS
from graft.tokenizer import Tokenizer

TEXT = "A fine film, truly a delight to watch."
QUESTION, PASSAGE = "Who directed it?", "The film was directed by Ada Lovelace in London."
# task -> (family, transformers class, extra config)
SETUPS = {
    "classification": (
        "bert",
        transformers.BertForSequenceClassification,
        {"id2label": {0: "neg", 1: "pos", 2: "mid"}},
    ),
    "token-classification": (
        "bert",
        transformers.BertForTokenClassification,
        {"id2label": {0: "O", 1: "B-PER", 2: "I-PER"}},
    ),
    "question-answering": ("bert", transformers.BertForQuestionAnswering, {}),
    "causal-lm": ("gpt2", transformers.GPT2LMHeadModel, {}),
}


def test_every_head_is_explained_or_refused():
    refused = {"embedding", "masked-lm", "image-classification", "image-text", "seq2seq"}
    assert set(TASKS) | refused == set(HEADS)  # the rest: refused
    assert set(SETUPS) == set(TASKS)


def saved(tmp_path, minilm, task: str):
    """(folder, transformers model): a random tiny model of the task with MiniLM's tokenizer; weights
    drawn wider than transformers' default so that attributions are far from float32's noise."""
    family, cls, extra = SETUPS[task]
    torch.manual_seed(0)
    cfg = tiny_hf_config(family)
    cfg.vocab_size = 30522
    cfg.initializer_range = 0.2
    for key, value in extra.items():
        setattr(cfg, key, value)
    folder = tmp_path / task
    ref = cls(cfg).eval()
    ref.save_pretrained(folder)
    Tokenizer.from_folder(minilm).save(folder)
    return folder, ref


def subject_of(folder, task: str, kernels: bool = False):
    model = load_model(folder, kernels=kernels)
    tokenizer = Tokenizer.from_folder(folder)
    if task == "question-answering":
        return subject(model, tokenizer, QUESTION, PASSAGE)
    return subject(model, tokenizer, TEXT)


def reference_scores(ref, s):
    """The explained number computed on transformers' model, by hand for each task."""
    extra = {k: v for k, v in s.batch.items() if k in ("attention_mask", "token_type_ids")}

    def forward(ids):
        n = ids.shape[0]
        out = ref(input_ids=ids, **{k: v.expand(n, -1) for k, v in extra.items()})
        if isinstance(ref, transformers.BertForQuestionAnswering):
            logits = out.start_logits if s.index == 0 else out.end_logits  # (N, T)
            return logits.softmax(-1)[:, s.position]
        logits = out.logits
        if logits.dim() == 3:  # token classification, LM: the target's position
            logits = logits[:, s.position]
        return logits.softmax(-1)[:, s.index]

    return forward


@pytest.mark.parametrize("task", TASKS)
def test_integrated_gradients_are_complete_and_equal_captum_on_transformers(task, tmp_path, minilm):
    from captum.attr import LayerIntegratedGradients

    folder, ref = saved(tmp_path, minilm, task)
    s = subject_of(folder, task)
    got = attribute(s, "ig", steps=100)
    with torch.no_grad():
        change = s.score() - float(s.scores(s.baseline_ids)[0])
    # completeness: the attributions add up to f(input) - f(baseline)
    assert abs(change) > 1e-4
    assert abs(sum(got.scores) - change) <= 0.01 * abs(change)
    assert abs(got.delta) <= 0.01 * abs(change)

    forward = reference_scores(ref, s)
    embeddings = ref.get_input_embeddings()
    lig = LayerIntegratedGradients(forward, embeddings)
    expected, delta = lig.attribute(
        s.input_ids, baselines=s.baseline_ids, n_steps=100, return_convergence_delta=True
    )
    expected = expected.sum(-1)[0]  # (T,)
    torch.testing.assert_close(
        torch.tensor(got.scores), expected, atol=2e-5 * float(expected.abs().max()), rtol=1e-4
    )
    assert abs(got.delta - float(delta[0])) <= 1e-4 * abs(change)


def test_integrated_gradients_batched_and_with_kernels_agree(tmp_path, minilm):
    folder, _ = saved(tmp_path, minilm, "classification")
    s = subject_of(folder, "classification")
    s.model.head.out.weight.requires_grad_(False)  # a frozen layer stays frozen, the rest train again
    one = attribute(s, "ig", steps=50)
    asking = {n for n, p in s.model.named_parameters() if p.requires_grad}
    assert "head.out.weight" not in asking and len(asking) == len(list(s.model.parameters())) - 1
    batched = attribute(subject_of(folder, "classification", kernels=True), "ig", steps=50, batch_size=7)
    torch.testing.assert_close(torch.tensor(batched.scores), torch.tensor(one.scores), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("task", TASKS)
def test_gradient_x_input_and_occlusion_equal_hand_computations(task, tmp_path, minilm):
    folder, ref = saved(tmp_path, minilm, task)
    s = subject_of(folder, task)
    forward = reference_scores(ref, s)
    # gradient x input on transformers' word embeddings
    embeddings = ref.get_input_embeddings()
    x = embeddings(s.input_ids).detach().requires_grad_(True)
    captured = {}

    def swap(module, args, output):
        captured["hit"] = True
        return x

    handle = embeddings.register_forward_hook(swap)
    try:
        (grad,) = torch.autograd.grad(forward(s.input_ids)[0], x)
    finally:
        handle.remove()
    assert captured["hit"]
    expected = (grad * x).norm(dim=-1)[0].detach()
    got = torch.tensor(attribute(s, "grad-x-input").scores)
    torch.testing.assert_close(got, expected, atol=1e-5 * float(expected.abs().max()), rtol=1e-4)

    occluded = attribute(s, "occlusion").scores
    with torch.no_grad():
        full = float(forward(s.input_ids)[0])
        for i, fixed in enumerate(s.fixed):
            ids = s.input_ids.clone()
            ids[0, i] = s.baseline_id
            expected_i = 0.0 if fixed else full - float(forward(ids)[0])
            assert occluded[i] == pytest.approx(expected_i, abs=1e-5)


def test_signed_gradient_x_input_after_a_layernorm_is_minus_the_position_terms(tmp_path, minilm):
    """Why gradient x input is the norm of each token's product, not its sum (bench/explain.py): the
    embeddings' LayerNorm is scale-invariant, so its input's gradient is orthogonal to its input, and
    the summed token term equals minus the position and type terms."""
    from graft.interpret.attributions import embeddings, frozen

    folder, _ = saved(tmp_path, minilm, "classification")
    s = subject_of(folder, "classification")
    with torch.enable_grad(), frozen(s.model):
        x = embeddings(s, s.input_ids).requires_grad_(True)
        (grad,) = torch.autograd.grad(s.scores(s.input_ids, inputs_embeds=x)[0], x)
    embed = s.model.body.embed
    rest = embed.positions(s.batch["position_ids"]) + embed.token_types(s.batch["token_type_ids"])
    token_term = (grad * x).sum(-1)[0].detach()  # (T,) the signed sum
    rest_term = (grad * rest).sum(-1)[0]  # (T,)
    norms = torch.tensor(attribute(s, "grad-x-input").scores)  # (T,) what the method gives
    torch.testing.assert_close(norms, (grad * x).norm(dim=-1)[0].detach(), atol=1e-6, rtol=1e-5)
    assert float(token_term.abs().max()) > 0
    torch.testing.assert_close(token_term, -rest_term, atol=1e-4 * float(token_term.abs().max()), rtol=0)


# one stack over tokens (CLIP: test_clip; image and seq2seq tasks are refused: test_every_head_is_explained_or_refused)
@pytest.fixture(
    params=sorted(n for n, f in FAMILIES.items() if f.inputs == "tokens" and not f.encoder_decoder)
)
def family(request) -> str:
    return request.param


def test_attention_maps_equal_transformers_for_every_family(family, tmp_path):
    hf_model(family).save_pretrained(tmp_path)
    eager = transformers.AutoModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    model = load_model(tmp_path, task="base")
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = torch.stack(eager(input_ids=ids, attention_mask=mask, output_attentions=True).attentions)
    got = attention_maps(model, {"input_ids": ids, "attention_mask": mask})  # (L, B, nh, T, T)
    assert got.shape == expected.shape
    real = mask.bool()[None, :, None, :, None] & mask.bool()[None, :, None, None, :]  # queries and keys
    torch.testing.assert_close(
        got[real.expand_as(got)], expected[real.expand_as(expected)], atol=1e-5, rtol=1e-4
    )


def test_rollout_equals_a_hand_computation_on_a_two_layer_model(tmp_path, minilm):
    folder, _ = saved(tmp_path, minilm, "classification")
    s = subject_of(folder, "classification")
    maps = attention_maps(s.model, s.batch)[:, 0]  # (2, nh, T, T)
    assert maps.shape[0] == 2
    # by hand: each layer's head mean, half residual, rows renormalized; layer 2 after layer 1
    T = maps.shape[-1]
    mixed = []
    for layer in range(2):
        a = maps[layer].sum(0) / maps.shape[1]
        a = [[0.5 * float(a[q, k]) + (0.5 if q == k else 0.0) for k in range(T)] for q in range(T)]
        mixed.append([[v / sum(r) for v in r] for r in a])
    expected = [[sum(mixed[1][q][j] * mixed[0][j][k] for j in range(T)) for k in range(T)] for q in range(T)]
    torch.testing.assert_close(rollout(maps), torch.tensor(expected), atol=1e-6, rtol=1e-5)
    # the CLS row is the classifier's rollout attribution
    assert attribute(s, "rollout").scores == pytest.approx(expected[0], abs=1e-6)
    assert attribute(s, "attention").scores == pytest.approx(maps[-1].mean(0)[0].tolist(), abs=1e-6)


def test_faithfulness_curves_areas_and_eraser_scores(tmp_path, minilm):
    folder, _ = saved(tmp_path, minilm, "classification")
    s = subject_of(folder, "classification")
    scores = attribute(s, "occlusion").scores
    deletion, insertion = curves(s, scores)
    n = len(s.free)
    with torch.no_grad():
        full, empty = s.score(), float(s.scores(s.baseline_ids)[0])
        # the curve's k-th point by hand: the top-k tokens replaced by the baseline token
        order = ranking(s, scores)
        assert sorted(order) == s.free and all(
            scores[a] >= scores[b] for a, b in zip(order, order[1:], strict=False)
        )
        ids = s.input_ids.clone()
        ids[0, order[:3]] = s.baseline_id
        assert deletion[3] == pytest.approx(float(s.scores(ids)[0]), abs=1e-6)
    assert len(deletion) == len(insertion) == n + 1
    assert deletion[0] == pytest.approx(full, abs=1e-6) and deletion[-1] == pytest.approx(empty, abs=1e-6)
    assert insertion[0] == pytest.approx(empty, abs=1e-6) and insertion[-1] == pytest.approx(full, abs=1e-6)
    f = faithfulness(s, scores)
    # (to the curves' own 1e-6: the full input's score comes from a forward of its own)
    assert f.deletion_area == pytest.approx(
        sum((a + b) / 2 for a, b in zip(deletion, deletion[1:], strict=False)) / n, abs=1e-6
    )
    ks = [max(1, round(q * n)) for q in BINS]
    assert f.comprehensiveness == pytest.approx(sum(full - deletion[k] for k in ks) / len(ks), abs=1e-6)
    assert f.sufficiency == pytest.approx(sum(full - insertion[k] for k in ks) / len(ks), abs=1e-6)
    assert area([0.0, 1.0, 1.0]) == pytest.approx(0.75)


def test_explain_refuses_what_it_cannot_explain(tmp_path, minilm):
    folder, _ = saved(tmp_path, minilm, "classification")
    model, tokenizer = load_model(folder), Tokenizer.from_folder(folder)
    with pytest.raises(GraftError, match="--target 'nag' is not one of neg, pos, mid; did you mean 'neg'"):
        subject(model, tokenizer, TEXT, target="nag")
    with pytest.raises(
        GraftError, match="--context is for question answering; this is a classification model"
    ):
        subject(model, tokenizer, TEXT, context="x")
    with pytest.raises(GraftError, match="--method 'gi' is not one of"):
        attribute(subject(model, tokenizer, TEXT), "gi")
    embedder = load_model(folder, task="embedding")
    with pytest.raises(GraftError, match=r"^explain: the embedding task is not supported \(supported: "):
        subject(embedder, tokenizer, TEXT)
    with pytest.raises(GraftError, match="a bare model has no task head"):
        from_ids(
            load_model(folder, task="base"), {"input_ids": torch.tensor([[5, 6]])}, ["a", "b"], [0, 0], 0
        )


def test_graft_explain_writes_terminal_view_json_png_and_page(tmp_path, minilm, cli):
    folder, _ = saved(tmp_path, minilm, "classification")
    out = tmp_path / "explained"
    result = cli(
        "explain",
        folder,
        "--text",
        TEXT,
        "--method",
        "ig,rollout",
        "--steps",
        "20",
        "--faithfulness",
        "--out",
        out,
    ).ok()
    assert "fine" in result.stdout and "convergence delta" in result.stdout and "rollout" in result.stdout
    table = json.loads(result.stdout.strip().splitlines()[-1])["faithfulness"]
    assert set(table) == {"ig", "rollout", "random"}
    saved_json = json.loads((out / "explanation.json").read_text())
    assert saved_json["tokens"][:3] == ["[CLS]", "a", "fine"] and set(saved_json["methods"]) == {
        "ig",
        "rollout",
    }
    assert (out / "explanation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "explanation.html").read_text()
    assert "http://" not in page and "https://" not in page  # self-contained: nothing fetched


@pytest.mark.parametrize("task", TASKS)
def test_graft_explain_runs_every_method_on_every_task(task, tmp_path, minilm, cli):
    folder, _ = saved(tmp_path, minilm, task)
    text = ["--text", QUESTION, "--context", PASSAGE] if task == "question-answering" else ["--text", TEXT]
    out = tmp_path / "out"
    cli("explain", folder, *text, "--method", "all", "--steps", "8", "--out", out).ok()
    saved_json = json.loads((out / "explanation.json").read_text())
    assert list(saved_json["methods"]) == ["ig", "grad-x-input", "occlusion", "attention", "rollout"]
    s = subject_of(folder, task)
    assert saved_json["tokens"] == s.tokens and saved_json["target"] == s.label
    assert saved_json["score"] == pytest.approx(s.score(), abs=1e-5)
    for method in saved_json["methods"].values():
        assert len(method["scores"]) == len(s.tokens)


def test_graft_explain_errors_are_one_line(tmp_path, minilm, cli):
    folder, _ = saved(tmp_path, minilm, "question-answering")
    line = cli("explain", folder, "--text", QUESTION).error_line()
    assert (
        line
        == "error: explain: a question-answering model needs --context (the passage; --text is the question)"
    )
    line = cli(
        "explain", folder, "--text", QUESTION, "--context", PASSAGE, "--method", "ig,saliency"
    ).error_line()
    assert "--method 'saliency' is not one of ig, grad-x-input, occlusion, attention, rollout" in line
    assert (
        cli("explain", folder, "--text", " ", "--context", PASSAGE).error_line()
        == "error: explain: --text is empty"
    )
    line = cli("explain", folder, "--text", QUESTION, "--context", PASSAGE, "--target", "middle").error_line()
    assert line == "error: explain: --target 'middle' is not one of start, end"


def test_page_opens_in_headless_chromium_without_errors_and_shows_the_tokens(tmp_path, minilm, cli, page):
    folder, _ = saved(tmp_path, minilm, "classification")
    out = tmp_path / "explained"
    cli("explain", folder, "--text", TEXT, "--method", "grad-x-input", "--out", out).ok()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto((out / "explanation.html").as_uri())
    shown = page.locator("#attributed .tok").all_inner_texts()
    assert [t.strip() for t in shown] == [
        "[CLS]",
        "a",
        "fine",
        "film",
        ",",
        "truly",
        "a",
        "delight",
        "to",
        "watch",
        ".",
        "[SEP]",
    ]
    assert page.locator("#grid canvas").count() == 2 * 4  # layers x heads
    # hovering "fine" colours the tokens by where it attends (mean of the heads)
    page.locator("#attributed .tok").nth(2).hover()
    title = page.locator("#attends .tok").nth(0).get_attribute("title")
    assert title.startswith("attention from fine: ")
    s = subject_of(folder, "classification")
    maps = attention_maps(s.model, s.batch)[:, 0]
    # the page carries each probability to 1/255
    assert float(title.split(": ")[1]) == pytest.approx(float(maps[:, :, 2, 0].mean()), abs=0.5 / 255)
    assert errors == []


def test_page_leaves_out_maps_beyond_its_limit_and_says_so(tmp_path, minilm, monkeypatch):
    from graft.interpret import render

    folder, _ = saved(tmp_path, minilm, "classification")
    s = subject_of(folder, "classification")
    expl = render.explanation(s, [attribute(s, "attention")])
    maps = attention_maps(s.model, s.batch)[:, 0]  # (2, 4, T, T)
    packed = render.packed_maps(maps)
    assert packed["shape"] == list(maps.shape)
    monkeypatch.setattr(render, "PAGE_MAPS_LIMIT", maps.numel() - 1)
    page = render.page(expl, maps)
    assert '"attentions": null' in page and f"attention maps left out: {maps.numel():,} values" in page
