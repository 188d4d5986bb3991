"""Tokenizers: a checkpoint's tokenizer files in, model-ready batches out.

The `tokenizers` library does the work; this module reads a Hugging Face-format folder
(tokenizer.json, or vocab.txt for WordPiece, or vocab.json + merges.txt for byte-level BPE),
picks up the special tokens and limits from tokenizer_config.json / special_tokens_map.json,
and turns texts into a `Batch` with everything later tasks need: padding and truncation,
text pairs, character offsets (NER, QA), word ids, sequence ids and overflowing windows.
Outputs match transformers' fast tokenizers token for token.
"""

from __future__ import annotations

import copy
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, fields
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

import torch
from tokenizers import AddedToken, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend
from tokenizers.models import BPE, WordPiece

from graft.errors import GraftError
from graft.io.atomic import write_text
from graft.io.hf import read_json

SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
UNLIMITED = int(1e30)  # transformers' model_max_length when a checkpoint states none
TRUNCATION_STRATEGIES = ("longest_first", "only_first", "only_second")
CONFIGURED_BACKENDS = 8  # padding/truncation settings whose configured backend copy is kept
# transformers' tokenizer-class defaults: bert-base-uncased, roberta-base and gpt2 ship tokenizer
# files that name no special tokens, and rely on these
BERT_SPECIALS = {
    "unk_token": "[UNK]",
    "sep_token": "[SEP]",
    "pad_token": "[PAD]",
    "cls_token": "[CLS]",
    "mask_token": "[MASK]",
}
ROBERTA_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>", "cls_token": "<s>"}
ROBERTA_SPECIALS |= {"unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<mask>"}
GPT2_SPECIALS = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
FAMILY_SPECIALS = {
    "bert": BERT_SPECIALS,
    "distilbert": BERT_SPECIALS,
    "roberta": ROBERTA_SPECIALS,
    "gpt2": GPT2_SPECIALS,
}


@dataclass
class Batch:
    """Encoded texts: one row per text, or per window when overflowing windows are returned.

    The id, mask and type-id fields are (B, T) long tensors with ``return_tensors='pt'``,
    else lists of lists. Offsets are (start, end) character spans into the text, or into
    the word when the input was split into words; special and pad tokens get (0, 0).
    """

    input_ids: torch.Tensor | list[list[int]]
    attention_mask: torch.Tensor | list[list[int]]
    token_type_ids: torch.Tensor | list[list[int]]
    special_tokens_mask: torch.Tensor | list[list[int]]
    offsets: list[list[tuple[int, int]]]
    word_ids: list[list[int | None]]  # index of the word in its sequence, None for special/pad tokens
    sequence_ids: list[list[int | None]]  # 0 for the text, 1 for its pair, None for special/pad tokens
    overflow_to_sample: torch.Tensor | list[int] | None = None  # row -> index of its input text

    def __len__(self) -> int:
        return len(self.input_ids)

    def to(self, device: torch.device | str) -> Batch:
        """Move the tensor fields to ``device``."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return Batch(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in moved.items()})


T = TypeVar("T")


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the checkpoint's special tokens, limits and chat template.

    GPT-2-style checkpoints have no pad token: ``special_tokens['pad_token']`` stays None (and
    save() writes none, as in the source), but ``pad_token_id`` and padding fall back to the
    eos token, the usual choice for decoders; the attention mask tells pads from real eos.

    encode() sets padding and truncation on the shared backend, so one Tokenizer should not
    encode from several threads at once.
    """

    def __init__(self, backend: Backend, config: dict[str, Any] | None = None):
        config = dict(config or {})
        self.backend = backend
        self.config = config  # the tokenizer_config.json keys, kept so save() writes them back
        # bos, eos, unk, sep, pad, cls, mask -> token string, None where the checkpoint has none
        self.special_tokens: dict[str, str | None] = {key: _content(config.get(key)) for key in SPECIAL_KEYS}
        self.additional_special_tokens: list[str] = _additional_special_tokens(config)
        if (
            self.special_tokens["pad_token"] is None and backend.padding
        ):  # as transformers: tokenizer.json's pad
            self.special_tokens["pad_token"] = backend.padding["pad_token"]
        self.model_max_length: int = int(config.get("model_max_length") or UNLIMITED)
        self.padding_side: str = config.get("padding_side", "right")
        self.truncation_side: str = config.get("truncation_side", "right")
        self.chat_template: str | None = config.get("chat_template")
        _add_special_tokens(backend, [*self.special_tokens.values(), *self.additional_special_tokens])
        # padding and truncation are chosen per encode() call, not baked in from the file
        backend.no_padding()
        backend.no_truncation()
        self._backends: OrderedDict[tuple, Backend] = OrderedDict()  # settings -> configured copy
        self._lock = threading.Lock()
        self._derived: dict[Hashable, Any] = {}  # derived()
        self._deriving = threading.Lock()

    def derived(self, key: Hashable, build: Callable[[], T]) -> T:
        """What ``build`` makes from this tokenizer, built once per ``key`` and kept with it, for
        every thread: e.g. llguidance's reading of the vocabulary (0.3-0.6 s for 49,152 tokens),
        which every constrained generate() call on the model needs."""
        with self._deriving:  # (not _lock: encode() need not wait for a build)
            if key not in self._derived:
                self._derived[key] = build()
            return self._derived[key]

    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> Tokenizer:
        """Load tokenizer.json, else vocab.txt (WordPiece), else vocab.json + merges.txt (byte-level BPE)."""
        folder = Path(path)
        if not folder.is_dir():
            raise GraftError(f"tokenizer folder not found: {folder}")
        config = read_json(folder / "tokenizer_config.json", missing_ok=True)
        config.update(
            read_json(folder / "special_tokens_map.json", missing_ok=True)
        )  # wins, as in transformers
        # the family (tokenizer_class, else config.json's model_type) supplies the special tokens files omit
        family = config.get("tokenizer_class") or read_json(folder / "config.json", missing_ok=True).get(
            "model_type"
        )
        family = (family or "").lower().removesuffix("fast").removesuffix("tokenizer")
        for key, token in FAMILY_SPECIALS.get(family, {}).items():
            config.setdefault(key, token)
        if (folder / "chat_template.jinja").exists():  # newer checkpoints keep the template in its own file
            config["chat_template"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        elif isinstance(config.get("chat_template"), list):  # named templates: use the default one
            named = {t["name"]: t["template"] for t in config["chat_template"]}
            config["chat_template"] = named.get("default")

        if (folder / "tokenizer.json").exists():
            file = folder / "tokenizer.json"
            try:
                backend = Backend.from_str(file.read_text(encoding="utf-8"))
            except Exception as e:
                raise GraftError(f"{file}: not a valid tokenizer.json ({_first_line(e)})") from None
        elif (folder / "vocab.txt").exists():
            backend = _wordpiece(folder / "vocab.txt", config)
        elif (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
            backend = _byte_level_bpe(folder / "vocab.json", folder / "merges.txt", config)
        else:
            raise GraftError(f"{folder}: no tokenizer.json, vocab.txt or vocab.json + merges.txt")
        return cls(backend, config)

    # ---- special tokens ----
    def _id(self, key: str) -> int | None:
        token = self.special_tokens[key]
        return None if token is None else self.backend.token_to_id(token)

    @property
    def pad_token_id(self) -> int | None:
        """The pad token's id, or the eos token's when there is no pad token (GPT-2)."""
        return self._id("pad_token") if self.special_tokens["pad_token"] else self._id("eos_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._id("eos_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._id("unk_token")

    @property
    def sep_token_id(self) -> int | None:
        return self._id("sep_token")

    @property
    def cls_token_id(self) -> int | None:
        return self._id("cls_token")

    @property
    def mask_token_id(self) -> int | None:
        return self._id("mask_token")

    @property
    def vocab_size(self) -> int:
        """Number of ids including added tokens (transformers' ``len(tokenizer)``)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    # ---- encoding ----
    def encode(
        self,
        texts: str | list[str] | list[list[str]],
        pairs: str | list[str] | list[list[str]] | None = None,
        *,
        max_length: int | None = None,
        truncation: bool | str = True,
        padding: bool | str = "longest",
        pad_to_multiple_of: int | None = None,
        stride: int = 0,
        return_overflowing: bool = False,
        is_split_into_words: bool = False,
        add_special_tokens: bool = True,
        return_tensors: str | None = "pt",
        padding_side: str | None = None,
    ) -> Batch:
        """Encode a batch of texts (or text pairs) into a `Batch`.

        A single text (or, with ``is_split_into_words``, a single list of words) is a batch of one.
        ``truncation``: True ('longest_first'), 'only_first', 'only_second' (QA: cut the context,
        never the question) or False; the limit is ``max_length``, else ``model_max_length``.
        ``padding``: 'longest' (or True), 'max_length' or False, on ``padding_side`` (default
        ``self.padding_side``). The tokenizer is not changed by a call: threads may share it.
        ``return_overflowing``: cut-off tokens become extra rows (windows overlapping by
        ``stride`` tokens) and ``overflow_to_sample`` maps each row to its text.
        """
        if return_tensors not in ("pt", None):
            raise GraftError(f"encode: return_tensors must be 'pt' or None, not {return_tensors!r}")
        batch = _as_batch(texts, is_split_into_words)
        if pairs is not None:
            second = _as_batch(pairs, is_split_into_words)
            if len(second) != len(batch):
                raise GraftError(f"encode: {len(batch)} texts but {len(second)} pairs")
            batch = list(zip(batch, second, strict=True))
        limit = max_length or (self.model_max_length if self.model_max_length < UNLIMITED else None)
        backend = self._configured(
            self._truncation(truncation, limit, stride),
            self._padding(padding, limit, pad_to_multiple_of, padding_side or self.padding_side),
        )
        try:
            encodings = backend.encode_batch(
                batch, is_pretokenized=is_split_into_words, add_special_tokens=add_special_tokens
            )
        except Exception as e:  # e.g. a question longer than max_length with truncation='only_second'
            raise GraftError(f"encode: {_first_line(e)}") from None

        rows, overflow_to_sample = [], []
        for i, encoding in enumerate(encodings):
            windows = [encoding, *encoding.overflowing] if return_overflowing else [encoding]
            rows += windows
            overflow_to_sample += [i] * len(windows)
        out = Batch(
            input_ids=[r.ids for r in rows],
            attention_mask=[r.attention_mask for r in rows],
            token_type_ids=[r.type_ids for r in rows],
            special_tokens_mask=[r.special_tokens_mask for r in rows],
            offsets=[r.offsets for r in rows],
            word_ids=[r.word_ids for r in rows],
            sequence_ids=[r.sequence_ids for r in rows],
            overflow_to_sample=overflow_to_sample if return_overflowing else None,
        )
        if return_tensors == "pt":
            if len({len(ids) for ids in out.input_ids}) > 1:
                raise GraftError("encode: rows differ in length; use padding or return_tensors=None")
            for name in ("input_ids", "attention_mask", "token_type_ids", "special_tokens_mask"):
                setattr(out, name, torch.tensor(getattr(out, name), dtype=torch.long))
            if return_overflowing:
                out.overflow_to_sample = torch.tensor(overflow_to_sample, dtype=torch.long)
        return out

    def _truncation(self, truncation: bool | str, limit: int | None, stride: int) -> tuple | None:
        """The backend's truncation settings for one encode() call (None: no truncation)."""
        strategy = "longest_first" if truncation is True else truncation
        if strategy and strategy not in TRUNCATION_STRATEGIES:
            raise GraftError(
                f"encode: truncation must be a bool or one of {TRUNCATION_STRATEGIES}, not {truncation!r}"
            )
        if strategy and limit is not None:
            return (limit, stride, strategy, self.truncation_side)
        return None

    def _padding(
        self, padding: bool | str, limit: int | None, multiple: int | None, side: str
    ) -> tuple | None:
        """The backend's padding settings for one encode() call (None: no padding)."""
        if not padding:
            return None
        if padding not in (True, "longest", "max_length"):
            raise GraftError(f"encode: padding must be 'longest', 'max_length' or False, not {padding!r}")
        if side not in ("left", "right"):
            raise GraftError(f"encode: padding_side must be 'left' or 'right', not {side!r}")
        if padding == "max_length" and limit is None:
            raise GraftError(
                "encode: padding='max_length' needs max_length (the checkpoint sets no model_max_length)"
            )
        pad_token = self.special_tokens["pad_token"] or self.special_tokens["eos_token"]
        if pad_token is None:
            raise GraftError("encode: padding needs a pad or eos token, and the tokenizer has neither")
        return (side, self.pad_token_id, pad_token, limit if padding == "max_length" else None, multiple)

    def _configured(self, truncation: tuple | None, padding: tuple | None) -> Backend:
        """A copy of the backend with these settings, made once and never changed afterwards.

        The Rust tokenizer keeps padding and truncation as state of its own: setting them per
        call on one shared backend would let two threads encoding at once see each other's
        settings. Each combination gets its own copy instead (a few ms, once), kept in a small
        cache that this tokenizer owns.
        """
        if truncation is None and padding is None:
            return self.backend
        key = (truncation, padding)
        with self._lock:
            backend = self._backends.get(key)
            if backend is not None:
                self._backends.move_to_end(key)
                return backend
        backend = copy.deepcopy(self.backend)
        if truncation is not None:
            limit, stride, strategy, direction = truncation
            backend.enable_truncation(limit, stride=stride, strategy=strategy, direction=direction)
        if padding is not None:
            side, pad_id, pad_token, length, multiple = padding
            backend.enable_padding(
                direction=side, pad_id=pad_id, pad_token=pad_token, length=length, pad_to_multiple_of=multiple
            )
        with self._lock:
            self._backends[key] = backend
            while len(self._backends) > CONFIGURED_BACKENDS:
                self._backends.popitem(last=False)
        return backend

    # ---- decoding and vocabulary ----
    def decode(self, ids: list[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Turn ids back into text."""
        return self.backend.decode(_as_ids(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(
        self, rows: list[list[int]] | torch.Tensor, skip_special_tokens: bool = True
    ) -> list[str]:
        """Decode each row of ids."""
        return self.backend.decode_batch([_as_ids(r) for r in rows], skip_special_tokens=skip_special_tokens)

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | list[int]:
        """Token string(s) to id(s); unknown tokens get the unk id (None when there is no unk token)."""
        if isinstance(tokens, str):
            found = self.backend.token_to_id(tokens)
            return self.unk_token_id if found is None else found
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | list[int] | torch.Tensor) -> str | list[str]:
        """Id(s) to token string(s), e.g. to label an attention map."""
        if isinstance(ids, int):
            return self.backend.id_to_token(ids)
        return [self.backend.id_to_token(i) for i in _as_ids(ids)]

    # ---- chat ----
    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        **variables: Any,
    ) -> str | list[int]:
        """Render ``messages`` ([{'role': ..., 'content': ...}]) with the checkpoint's chat template.

        Same rendering as transformers' apply_chat_template: the special tokens (bos_token,
        eos_token...) and ``variables`` are visible to the template, which may call
        raise_exception(). ``tokenize=True`` returns ids, without adding special tokens again.
        """
        if not self.chat_template:
            raise GraftError(
                "apply_chat_template: the tokenizer has no chat_template (tokenizer_config.json)"
            )
        template = _compile_chat_template(self.chat_template)
        import jinja2  # _compile_chat_template has checked it is installed

        named = {key: token for key, token in self.special_tokens.items() if token is not None}
        # as transformers: drop None fields, which templates tend to render as "None"
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            text = template.render(
                **{"tools": None, "documents": None, **named, **variables},
                messages=messages,
                add_generation_prompt=add_generation_prompt,
            )
        except jinja2.TemplateError as e:
            raise GraftError(f"chat template: {_first_line(e)}") from None
        if not tokenize:
            return text
        return self.backend.encode(text, add_special_tokens=False).ids

    # ---- saving ----
    def save(self, folder: str | os.PathLike) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json (loadable by transformers)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        named = {key: token for key, token in self.special_tokens.items() if token is not None}
        if self.additional_special_tokens:
            named["additional_special_tokens"] = self.additional_special_tokens
        config = {
            k: v
            for k, v in self.config.items()
            if k not in ("additional_special_tokens", "extra_special_tokens")
        }
        config.update(named)
        config.update(
            model_max_length=self.model_max_length,
            padding_side=self.padding_side,
            truncation_side=self.truncation_side,
            chat_template=self.chat_template,
            added_tokens_decoder={
                str(i): _added_token_dict(t) for i, t in self.backend.get_added_tokens_decoder().items()
            },
        )
        if not config.get("chat_template"):
            config.pop("chat_template")
        # the loaders set the class for vocabulary files; tokenizer.json alone loads in the generic class
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        write_text(folder / "tokenizer.json", self.backend.to_str(pretty=True))
        write_text(folder / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False))
        write_text(folder / "special_tokens_map.json", json.dumps(named, indent=2, ensure_ascii=False))


# ---- building a backend from vocabulary files (same pipelines as transformers' tokenizer classes) ----
def _wordpiece(vocab_file: Path, config: dict[str, Any]) -> Backend:
    lines = _read_text(vocab_file).split("\n")
    vocab = {token: i for i, token in enumerate(lines[:-1] if lines[-1] == "" else lines)}
    config.setdefault("tokenizer_class", "BertTokenizer")
    for key, token in BERT_SPECIALS.items():  # a vocab.txt folder is BERT's, whatever it names
        config.setdefault(key, token)
    cls, sep, unk = (
        _content(config[key]) or BERT_SPECIALS[key] for key in ("cls_token", "sep_token", "unk_token")
    )
    backend = Backend(WordPiece(vocab, unk_token=unk))
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=config.get("tokenize_chinese_chars", True),
        strip_accents=config.get("strip_accents"),  # None: strip when lowercasing, like BERT
        lowercase=config.get("do_lower_case", True),
    )
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    _add_config_tokens(backend, config)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0",
        pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, backend.token_to_id(cls)), (sep, backend.token_to_id(sep))],
    )
    return backend


def _byte_level_bpe(vocab_file: Path, merges_file: Path, config: dict[str, Any]) -> Backend:
    vocab = read_json(vocab_file)
    merges = []
    for number, line in enumerate(_read_text(merges_file).splitlines(), start=1):
        if not line or line.startswith("#version"):
            continue
        pair = tuple(line.split(" "))
        if len(pair) != 2:
            raise GraftError(
                f"{merges_file}:{number}: expected two tokens separated by a space, got {line!r}"
            )
        merges.append(pair)
    add_prefix_space = config.get("add_prefix_space", False)
    backend = Backend(
        BPE(vocab, merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    )
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    backend.decoder = decoders.ByteLevel()
    cls, sep = _content(config.get("cls_token")), _content(config.get("sep_token"))
    if not (cls and sep):  # GPT-2, unless the files said otherwise
        for key, token in GPT2_SPECIALS.items():
            config.setdefault(key, token)
    _add_config_tokens(backend, config)
    if cls and sep:  # RoBERTa: <s> A </s></s> B </s>
        config.setdefault("tokenizer_class", "RobertaTokenizer")
        backend.post_processor = processors.RobertaProcessing(
            (sep, backend.token_to_id(sep)),
            (cls, backend.token_to_id(cls)),
            trim_offsets=config.get("trim_offsets", True),
            add_prefix_space=add_prefix_space,
        )
        return backend
    # GPT-2: no special tokens unless the config asks for bos/eos; the pair gets type id 1
    config.setdefault("tokenizer_class", "GPT2Tokenizer")
    bos, eos = _content(config.get("bos_token")), _content(config.get("eos_token"))
    use_bos, use_eos = bool(config.get("add_bos_token") and bos), bool(config.get("add_eos_token") and eos)
    single = f"{bos + ':0 ' if use_bos else ''}$A:0{' ' + eos + ':0' if use_eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if use_bos else ''} $B:1{' ' + eos + ':1' if use_eos else ''}"
    specials = [(t, backend.token_to_id(t)) for t, used in ((bos, use_bos), (eos, use_eos)) if used]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    return backend


def _add_config_tokens(backend: Backend, config: dict[str, Any]) -> None:
    """Register the config's added tokens, then its special tokens, as transformers' tokenizer classes do."""
    entries = config.get("added_tokens_decoder") or {}
    for t in [entries[i] for i in sorted(entries, key=int)]:
        # keep lstrip/rstrip..., e.g. RoBERTa's <mask> swallows the space before it
        options = {k: t[k] for k in ("single_word", "lstrip", "rstrip", "normalized", "special") if k in t}
        backend.add_tokens([AddedToken(t["content"], **options)])
    named = [_content(config.get(key)) for key in SPECIAL_KEYS]
    _add_special_tokens(backend, [*named, *_additional_special_tokens(config)])


def _add_special_tokens(backend: Backend, tokens: list[str | None]) -> None:
    """Add the special tokens the backend lacks as unsplittable added tokens."""
    known = {token.content for token in backend.get_added_tokens_decoder().values()}
    missing = dict.fromkeys(t for t in tokens if t and t not in known)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])


def _additional_special_tokens(config: dict[str, Any]) -> list[str]:
    # transformers 5 calls them extra_special_tokens, and allows a dict of named ones
    extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
    return [_content(token) for token in (extra.values() if isinstance(extra, dict) else extra)]


# ---- small helpers ----
def _content(token: Any) -> str | None:
    """A special token written as a string or as an AddedToken dict {'content': ...}."""
    return token.get("content") if isinstance(token, dict) else token


def _added_token_dict(token: AddedToken) -> dict[str, Any]:
    keys = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
    return {k: getattr(token, k) for k in keys}


def _as_batch(texts: Any, is_split_into_words: bool) -> list:
    if is_split_into_words:
        return [texts] if texts and isinstance(texts[0], str) else list(texts)
    return [texts] if isinstance(texts, str) else list(texts)


def _as_ids(ids: Any) -> list[int]:
    return ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise GraftError(f"{file}: cannot read ({_first_line(e)})") from None


@lru_cache(maxsize=16)
def _compile_chat_template(source: str) -> Any:
    """Compile like transformers: sandboxed, trim_blocks/lstrip_blocks, tojson, raise_exception, strftime_now."""
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise GraftError("apply_chat_template needs jinja2: pip install jinja2") from None

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: Any = None,
        separators: Any = None,
        sort_keys: bool = False,
    ):
        # jinja's own tojson escapes HTML characters, which would change the prompt
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise GraftError(f"chat template: line {e.lineno}: {e.message}") from None
