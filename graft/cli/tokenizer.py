"""``graft tokenizer train`` and ``graft tokenizer extend``: new vocabularies, or domain words added to a model's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from graft.cli.app import app

tokenizer_app = typer.Typer(
    help="Train a tokenizer on a corpus, or extend a model's vocabulary.", no_args_is_help=True
)
app.add_typer(tokenizer_app, name="tokenizer")


@tokenizer_app.command("train")
def train(
    files: Annotated[
        list[Path], typer.Argument(help="Corpus files: .txt (a document per line) or .jsonl ('text').")
    ],
    out: Annotated[Path, typer.Option("--out", help="The tokenizer folder to write.")],
    kind: Annotated[
        str, typer.Option("--kind", help="wordpiece (BERT), bpe (byte-level, GPT-2) or unigram (T5).")
    ] = "wordpiece",
    vocab_size: Annotated[
        int, typer.Option("--vocab-size", help="Tokens in the vocabulary, special ones included.")
    ] = 8000,
    cased: Annotated[bool, typer.Option("--cased", help="Keep upper case (wordpiece, unigram).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the folder --out holds.")] = False,
) -> None:
    """Train a new tokenizer on text files; writes tokenizer.json and its config (transformers loads it)."""
    from graft.io.atomic import atomic_folder, check_output
    from graft.pretrain.vocab import train_tokenizer

    target = check_output(out, "--out", folder=True, overwrite=overwrite)
    tokenizer = train_tokenizer([str(f) for f in files], kind, vocab_size, lowercase=not cased)
    with atomic_folder(target) as folder:
        tokenizer.save(folder)
    typer.echo(json.dumps({"kind": kind, "vocab_size": len(tokenizer), "out": str(target)}))


@tokenizer_app.command("extend")
def extend(
    model: Annotated[str, typer.Argument(help="A model folder or Hub id (its tokenizer is extended).")],
    words: Annotated[list[str], typer.Argument(help="Domain words, or .txt files of a word per line.")],
    out: Annotated[Path, typer.Option("--out", help="The folder for the model and its tokenizer.")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the folder --out holds.")] = False,
) -> None:
    """Add domain words to a model's vocabulary, each one token whose embedding starts as the mean of its old pieces."""
    from graft.pretrain.vocab import extend_vocabulary

    typer.echo(json.dumps(extend_vocabulary(model, words, out, overwrite=overwrite)))
