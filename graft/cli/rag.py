"""``graft rag index|ask|eval``: retrieval-augmented generation at the command line (chapter 10).

graft rag index docs/ notes.md faq.jsonl --model EMBEDDER --out INDEX/
graft rag ask INDEX --model CHAT_MODEL "What did the report find?" [--k 4] [--rerank CROSS_ENCODER]
graft rag eval INDEX --data qa.jsonl [--model CHAT_MODEL]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from graft.cli.app import ReferenceOpt, app
from graft.cli.generate import DType, DTypeOpt, MaxNew, Seed, Temperature, write
from graft.errors import GraftError

rag = typer.Typer(
    help="Retrieval-augmented generation: index documents, answer questions citing them, evaluate both."
)
app.add_typer(rag, name="rag")


@rag.callback(invoke_without_command=True)
def rag_root(ctx: typer.Context) -> None:
    """Retrieval-augmented generation: index documents, answer questions citing them, evaluate both."""
    if ctx.invoked_subcommand is None:  # `graft rag` alone: the help, and success
        typer.echo(ctx.get_help())
        raise typer.Exit()


IndexArg = Annotated[Path, typer.Argument(metavar="INDEX", help="A folder written by graft rag index.")]
K = Annotated[int, typer.Option("--k", min=1, help="How many chunks to retrieve.")]
Rerank = Annotated[
    str | None,
    typer.Option(
        help="A cross-encoder (a classification model of (question, passage) pairs) to rerank with."
    ),
]
Candidates = Annotated[
    int | None,
    typer.Option(min=1, help="With --rerank: how many nearest chunks it reranks (default 4 x --k)."),
]
EmbedderOpt = Annotated[
    str | None,
    typer.Option(help="The embedder, when the index's is elsewhere now (it must be the same model)."),
]


@rag.command("index")
def index_command(
    docs: Annotated[
        list[Path],
        typer.Argument(metavar="DOCS...", help="Text, Markdown or JSONL files, or folders of them."),
    ],
    model: Annotated[str, typer.Option(help="The sentence encoder that embeds the chunks.")],
    out: Annotated[Path, typer.Option(help="The index folder to write.")],
    chunk_tokens: Annotated[int, typer.Option(min=1, help="Tokens per chunk (the embedder's tokens).")] = 200,
    overlap: Annotated[int, typer.Option(min=0, help="Tokens each chunk shares with the next.")] = 40,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT when it is not empty.")] = False,
    reference: ReferenceOpt = False,
) -> None:
    """Cut documents into overlapping chunks of tokens, embed them, and write an index folder."""
    from graft.io.atomic import check_output
    from graft.rag import Embedder, build, read_corpus, spans

    check_output(out, "--out", folder=True, overwrite=overwrite)
    spans(0, chunk_tokens, overlap)  # the two options agree, before any work
    documents, skipped = read_corpus(docs)
    embedder = Embedder(model, kernels=not reference)
    index = build(embedder, documents, chunk_tokens, overlap)
    index.save(out)
    others = f" (skipped {len(skipped)} files of other types, e.g. {skipped[0]})" if skipped else ""
    typer.echo(f"indexed {len(index.chunks)} chunks of {len(documents)} documents in {out}{others}", err=True)


def open_index(folder: Path, embedder: str | None, reference: bool) -> tuple[Any, Any]:
    """(the index, its embedder), the embedder checked to be the one the index was built with."""
    from graft.rag import Embedder, load

    index = load(folder)
    name = embedder or index.manifest["embedder"]
    if embedder is None and not Path(name).is_dir():
        raise GraftError(
            f"{folder}: the index's embedder {name} is not found (pass --embedder with the same model)"
        )
    model = Embedder(name, kernels=not reference)
    index.check_embedder(model)
    return index, model


def open_reranker(rerank: str | None, reference: bool) -> Any:
    from graft.rag import Reranker

    return Reranker(rerank, kernels=not reference) if rerank is not None else None


def open_chat_model(model: str, dtype: DType, reference: bool) -> tuple[Any, Any, dict[str, Any]]:
    from graft.cli.generate import load

    lm, tokenizer, defaults = load(model, dtype, reference=reference)
    if not tokenizer.chat_template:
        raise GraftError(
            f"{model}: the tokenizer has no chat template, so graft rag cannot prompt it with sources "
            "(use a chat or instruct model)"
        )
    return lm, tokenizer, defaults


def prompt(lm: Any, tokenizer: Any, question: str, hits: list, new_tokens: int) -> tuple[Any, Any, list]:
    """(ids, mask, the hits kept): the lowest-ranked sources are left out until the prompt and the
    answer fit the chat model's context."""
    from graft.generation import encode_prompts
    from graft.rag import messages

    context = lm.config.max_positions
    for kept in range(len(hits), 0, -1):
        ids, mask = encode_prompts(tokenizer, [messages(question, hits[:kept])], chat=True)
        if ids.shape[1] + new_tokens <= context:
            if kept < len(hits):
                typer.echo(
                    f"rag: kept {kept} of {len(hits)} sources to fit the {context}-token context", err=True
                )
            return ids, mask, hits[:kept]
    raise GraftError(
        f"rag: the prompt with one source and {new_tokens} new tokens does not fit the chat model's "
        f"{context}-token context (lower --max-new-tokens or rebuild the index with fewer --chunk-tokens)"
    )


def answer(lm: Any, tokenizer: Any, ids: Any, mask: Any, config: Any, stream: bool) -> str:
    """The chat model's answer: streamed to stdout, or generated whole."""
    from graft.cli.generate import reply
    from graft.generation import generate

    if stream:
        return reply(lm, tokenizer, ids, mask, config)
    row = generate(lm, ids, mask, config, tokenizer)[0, ids.shape[1] :].tolist()
    ends = [i for i, t in enumerate(row) if t in config.eos_ids]
    return tokenizer.decode(row[: ends[0]] if ends else row).strip()


def chat_config(lm: Any, tokenizer: Any, defaults: dict[str, Any], **options: Any) -> Any:
    from graft.cli.generate import generation_config

    return generation_config(
        lm, tokenizer, defaults, top_k=None, top_p=None, min_p=None, repetition_penalty=None, **options
    )


@rag.command()
def ask(
    index_folder: IndexArg,
    question: Annotated[str, typer.Argument(help="The question.")],
    model: Annotated[str, typer.Option(help="The chat model (a HF folder, a Hub id, or a .gguf file).")],
    k: K = 4,
    rerank: Rerank = None,
    candidates: Candidates = None,
    embedder: EmbedderOpt = None,
    max_new_tokens: MaxNew = 256,
    temperature: Temperature = None,
    seed: Seed = None,
    dtype: DTypeOpt = DType.float32,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object instead of streaming.")
    ] = False,
    reference: ReferenceOpt = False,
) -> None:
    """Answer a question from an index: the top --k chunks as numbered sources, the answer citing them."""
    if not question.strip():
        raise GraftError("rag ask: the question is empty")
    index, encoder = open_index(index_folder, embedder, reference)
    reranker = open_reranker(rerank, reference)
    lm, tokenizer, defaults = open_chat_model(model, dtype, reference)
    from graft.rag import retrieve

    hits = retrieve(index, encoder, question, k, reranker, candidates)
    ids, mask, hits = prompt(lm, tokenizer, question, hits, max_new_tokens)
    config = chat_config(
        lm, tokenizer, defaults, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed
    )
    text = answer(lm, tokenizer, ids, mask, config, stream=not as_json)
    sources = [
        {
            "n": n,
            "source": h.chunk.source,
            "start": h.chunk.start,
            "end": h.chunk.end,
            "chunk": h.id,
            "score": h.score,
        }
        for n, h in enumerate(hits, 1)
    ]
    if as_json:
        write(
            json.dumps({"question": question, "answer": text, "sources": sources}, ensure_ascii=False) + "\n"
        )
        return
    write("\nSources:\n")
    for s in sources:
        write(f"[{s['n']}] {s['source']} (characters {s['start']}-{s['end']}, score {s['score']:.3f})\n")


@rag.command("eval")
def eval_command(
    index_folder: IndexArg,
    data: Annotated[
        Path,
        typer.Option(help='JSON lines: {"question": ..., "answer": ..., "source": FILE or "chunk": ID}.'),
    ],
    model: Annotated[
        str | None, typer.Option(help="A chat model: answer each question and score the answers (ROUGE-L).")
    ] = None,
    k: K = 4,
    rerank: Rerank = None,
    candidates: Candidates = None,
    embedder: EmbedderOpt = None,
    max_new_tokens: MaxNew = 128,
    dtype: DTypeOpt = DType.float32,
    reference: ReferenceOpt = False,
) -> None:
    """Retrieval recall@k and MRR against gold sources or chunks; with --model, answer ROUGE-L: one JSON line."""
    from graft.rag import evaluate, read_questions, retrieve

    questions = read_questions(data)
    if model is None and not any(q.sources or q.chunks for q in questions):
        raise GraftError(
            f'{data}: no question names a gold "source" or "chunk" to measure retrieval by; '
            "add them, or pass --model to score answers"
        )
    index, encoder = open_index(index_folder, embedder, reference)
    reranker = open_reranker(rerank, reference)
    retrieved = [retrieve(index, encoder, q.question, k, reranker, candidates) for q in questions]
    answers = None
    if model is not None:
        lm, tokenizer, defaults = open_chat_model(model, dtype, reference)
        config = chat_config(
            lm, tokenizer, defaults, max_new_tokens=max_new_tokens, temperature=0.0, seed=None
        )
        answers = []
        for q, hits in zip(questions, retrieved, strict=True):
            ids, mask, _ = prompt(lm, tokenizer, q.question, hits, max_new_tokens)
            answers.append(answer(lm, tokenizer, ids, mask, config, stream=False))
    sys.stdout.write(json.dumps(evaluate(questions, retrieved, answers)) + "\n")
