"""Vocabularies (chapter 4): train a tokenizer on a corpus, or extend a model's with domain words.

A new tokenizer (WordPiece as BERT's, byte-level BPE as GPT-2's, Unigram as SentencePiece's) is
trained by the tokenizers library on the documents of .txt/.jsonl files, streamed. Extending
adds each domain word as one token after the old ones, so every old id keeps its meaning, and
grows the model's token table (and a separate output layer) by a row per word, initialized as
the mean of the rows of the pieces the old tokenizer cut the word into: the model reads the new
token about as it read the pieces, and reads every old text exactly as before.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as Backend
from torch import nn

from graft.errors import GraftError
from graft.io.atomic import atomic_folder, check_output
from graft.loading import load_model, load_processor, save_model
from graft.nn import TransformerConfig
from graft.pretrain.stream import check_files, documents
from graft.tokenizer import Tokenizer

KINDS = ("wordpiece", "bpe", "unigram")


def corpus(files: Sequence[str]) -> Iterator[str]:
    """The documents of ``files``; an error when there is none (before any training)."""
    paths = check_files(files)
    stream = documents(paths)
    first = next(stream, None)
    if first is None:
        raise GraftError(f"tokenizer: the corpus has no text ({', '.join(map(str, paths))})")
    yield first
    yield from stream


def train_tokenizer(
    files: Sequence[str], kind: str = "wordpiece", vocab_size: int = 8000, lowercase: bool = True
) -> Tokenizer:
    """A new tokenizer of ``kind`` with ``vocab_size`` tokens (special tokens included) learnt from ``files``."""
    if kind not in KINDS:
        raise GraftError(f"tokenizer: --kind {kind}: unknown (known: {', '.join(KINDS)})")
    if vocab_size < 10:
        raise GraftError(f"tokenizer: --vocab-size must be at least 10, found {vocab_size}")
    texts = corpus(files)
    if kind == "wordpiece":  # BERT's: [CLS] text [SEP], ## continues a word
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        backend = Backend(models.WordPiece(unk_token="[UNK]"))
        backend.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.decoder = decoders.WordPiece()
        trainer: Any = trainers.WordPieceTrainer(
            vocab_size=vocab_size, special_tokens=specials, show_progress=False
        )
        config = dict(
            zip(("pad_token", "unk_token", "cls_token", "sep_token", "mask_token"), specials, strict=True)
        )
    elif kind == "bpe":  # GPT-2's: bytes, no unknown token
        if vocab_size <= 257:
            raise GraftError(
                f"tokenizer: --vocab-size {vocab_size} leaves no merges: a byte-level BPE starts with 257 tokens"
                " (256 bytes and <|endoftext|>)"
            )
        specials = ["<|endoftext|>"]
        backend = Backend(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        config = {"bos_token": specials[0], "eos_token": specials[0], "unk_token": specials[0]}
    else:  # SentencePiece's unigram: ▁ marks a word's start; </s> closes a text, as T5's does
        specials = ["<pad>", "</s>", "<unk>"]
        backend = Backend(models.Unigram())
        if lowercase:
            backend.normalizer = normalizers.Lowercase()
        backend.pre_tokenizer = pre_tokenizers.Metaspace()
        backend.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>", show_progress=False
        )
        config = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    backend.train_from_iterator(texts, trainer=trainer)
    if kind == "wordpiece":
        cls, sep = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
        )
    elif kind == "unigram":
        backend.post_processor = processors.TemplateProcessing(
            single="$A </s>",
            pair="$A </s> $B:1 </s>:1",
            special_tokens=[("</s>", backend.token_to_id("</s>"))],
        )
    return Tokenizer(backend, config | {"do_lower_case": lowercase} if kind == "wordpiece" else config)


def read_words(words: Sequence[str]) -> list[str]:
    """Domain words, each once, in order: given as they are, or a .txt file of a word per line."""
    found: list[str] = []
    for item in words:
        path = Path(item)
        if path.suffix == ".txt":
            if not path.is_file():
                raise GraftError(f"{path}: file not found")
            items = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        else:
            items = [item.strip()]
        for n, word in enumerate(items, 1):
            if word and any(c.isspace() for c in word):
                where = f"{path}:{n}" if path.suffix == ".txt" else repr(word)
                raise GraftError(f"{where}: a domain word is one word, without spaces")
            if word and word not in found:
                found.append(word)
    if not found:
        raise GraftError("tokenizer extend: no words to add (give words, or a .txt file of a word per line)")
    return found


def grow(model: nn.Module, pieces: list[list[int]]) -> None:
    """Append one row per new token to every vocabulary-sized tensor of the model (the token table, an
    untied output layer and its bias): the mean of the rows of its pieces. Tied weights stay tied."""
    cfg = model.config
    old = cfg.vocab_size
    grown: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None or param.shape[0] != old:
                continue
            if id(param) not in grown:
                rows = torch.stack([param.data[p].mean(0) for p in pieces])  # (N, ...)
                grown[id(param)] = nn.Parameter(
                    torch.cat([param.data, rows]), requires_grad=param.requires_grad
                )
            module._parameters[name] = grown[id(param)]
        if isinstance(module, nn.Embedding) and module.num_embeddings == old:
            module.num_embeddings = old + len(pieces)
        if isinstance(module, nn.Linear) and module.out_features == old:
            module.out_features = old + len(pieces)
    cfg.vocab_size = old + len(pieces)


def extend_vocabulary(
    model_path: str | Path, words: Sequence[str], out: str | Path, overwrite: bool = False
) -> dict[str, Any]:
    """The model and tokenizer at ``model_path`` with ``words`` added as single tokens, saved together to ``out``.

    Returns {"added": the new words, "skipped": words already one token, "vocab_size": the new size}.
    """
    target = check_output(out, "--out", folder=True, overwrite=overwrite)
    wanted = read_words(words)
    tokenizer = load_processor(model_path)
    if not isinstance(tokenizer, Tokenizer):
        raise GraftError(
            f"{model_path}: tokenizer extend needs a text model (this one reads images or audio)"
        )
    model = load_model(model_path, kernels=False)
    if not isinstance(model.config, TransformerConfig):
        raise GraftError(
            f"{model_path}: tokenizer extend takes an encoder or a decoder model, not an encoder-decoder"
        )
    if len(tokenizer) > model.config.vocab_size:
        raise GraftError(
            f"{model_path}: the tokenizer has {len(tokenizer)} tokens but the model's table only"
            f" {model.config.vocab_size} rows"
        )
    added, skipped, pieces = [], [], []
    for word in wanted:
        ids = tokenizer.encode(word, add_special_tokens=False, return_tensors=None).input_ids[0]
        if len(ids) == 1:
            skipped.append(word)  # already one token: nothing to learn
            continue
        added.append(word)
        pieces.append(ids)
    if added:
        # after every id the model has (a checkpoint's table may hold unused rows past the tokenizer)
        first = model.config.vocab_size
        padding = [f"<graft_unused_{i}>" for i in range(first - len(tokenizer))]
        tokenizer.backend.add_tokens([AddedToken(t, special=True) for t in padding])
        # matched in normalized text (lower case for an uncased model), never inside a longer word
        normalizer = tokenizer.backend.normalizer
        forms = [normalizer.normalize_str(w) if normalizer else w for w in added]
        tokenizer.backend.add_tokens([AddedToken(w, single_word=True, normalized=True) for w in forms])
        grow(model, pieces)
    with atomic_folder(target) as folder:
        save_model(model, folder, tokenizer)
    return {"added": added, "skipped": skipped, "vocab_size": model.config.vocab_size}
