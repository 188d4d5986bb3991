"""Run an exported graft folder with only onnxruntime, tokenizers and numpy (no torch, no graft).

graft export copies this file into OUT/ as runtime.py. In a fresh environment:

    python -m venv env && env/bin/pip install onnxruntime tokenizers numpy
    env/bin/python OUT/runtime.py OUT/ "first text" "second text"      # one JSON line per text
    env/bin/python OUT/runtime.py OUT/ --generate 32 "Once upon a time"   # a causal LM: greedy, KV cache

or from Python, next to the file (the whole API is the class Exported):

    from runtime import Exported

    model = Exported("OUT/")                   # reads manifest.json, config.json, labels.json
    model.predict(["A fine film.", "Dull."])   # classifier: [{"label": ..., "score": ...}, ...]
                                               # tagger: {"tags": [...]}; embeddings: {"embedding": [...]}
    inputs = model.encode(["some text"])       # numpy int64 arrays named as the manifest's inputs
    outputs = model.run(inputs)                # the graph's outputs, in the manifest's order

    # a decoder: prompts as token ids, greedy tokens back (the end token kept, then the row stops)
    ids = model.tokenizer.encode("The capital of France is").ids
    new = model.generate([ids], max_new_tokens=32, eos=[model.config["eos_token_id"]])
    print(model.tokenizer.decode(new[0]))

    # an encoder-decoder (T5, BART, Whisper): the source's inputs, greedy tokens after the start token
    new = model.generate_seq2seq(model.encode(["translate: a cat"]), 32, eos=[model.config["eos_token_id"]])
    new = model.generate_seq2seq({"input_features": features}, 32)    # Whisper: (B, mel bins, frames)

What the folder holds: manifest.json lists every input and output (name, dtype, shape with axis
names for the dynamic axes) and, for a decoder, the cache layout: one merged graph whose inputs
are input_ids, attention_mask (past + new positions), position_ids and past_key_values.{i}.key /
.value, and whose outputs are logits and present.{i}.key / .value. The prompt runs with empty past
tensors (B, kv_heads, 0, head_dim); each step feeds one token per row and the previous presents.
Prompts are left-padded and positions count real tokens from 0, as in graft's own generation.

An encoder-decoder's folder holds two graphs (manifest "graphs"): encoder.onnx, run once per
source, gives encoder_hidden_states and every decoder layer's cross-attention keys and values
(cross.{i}.key / .value); decoder.onnx takes decoder_input_ids, encoder_attention_mask (not
Whisper's), past_key_values.{i}.* (empty for the first call: the start token) and the cross.{i}.*
tensors, and gives logits and present.{i}.*. The decoder's rows are never padded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer


class Exported:
    """An exported folder: tokenize, run, read the outputs."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.manifest = json.loads((self.folder / "manifest.json").read_text(encoding="utf-8"))
        self.config = json.loads((self.folder / "config.json").read_text(encoding="utf-8"))
        graphs = self.manifest.get("graphs") or {"model": {"file": self.manifest["file"]}}
        self.sessions = {
            name: ort.InferenceSession(str(self.folder / g["file"]), providers=["CPUExecutionProvider"])
            for name, g in graphs.items()
        }
        self.inputs = [i["name"] for i in self.manifest["inputs"]]
        labels = self.folder / "labels.json"
        self.labels = json.loads(labels.read_text(encoding="utf-8"))["id2label"] if labels.exists() else None
        tokenizer = self.folder / "tokenizer.json"
        self.tokenizer = Tokenizer.from_file(str(tokenizer)) if tokenizer.exists() else None
        pad = self.config.get("pad_token_id")
        self.pad_id = pad if isinstance(pad, int) else 0

    def encode(self, texts: list[str], side: str = "right") -> dict[str, np.ndarray]:
        """Token ids, mask (and segments) of ``texts``, padded on ``side``."""
        limit = self.config.get("max_position_embeddings") or self.config.get("n_positions") or 512
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(limit)
        encodings = self.tokenizer.encode_batch(texts)
        width = max(len(e.ids) for e in encodings)
        ids = np.full((len(texts), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(texts), width), dtype=np.int64)
        types = np.zeros((len(texts), width), dtype=np.int64)
        for row, e in enumerate(encodings):
            n = len(e.ids)
            cols = slice(width - n, width) if side == "left" else slice(0, n)
            ids[row, cols], mask[row, cols], types[row, cols] = e.ids, 1, e.type_ids
        inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        return {k: v for k, v in inputs.items() if k in self.inputs}

    def run(self, inputs: dict[str, np.ndarray], graph: str | None = None) -> list[np.ndarray]:
        """The outputs of ``graph`` (the first one by default: the only one, or the encoder)."""
        row = empty_row(inputs)
        if row is not None:
            raise ValueError(
                f"attention_mask row {row} is all zeros: an input with no real token has no output"
            )
        session = self.sessions[graph] if graph is not None else next(iter(self.sessions.values()))
        return session.run(None, inputs)

    def graph_names(self, graph: str, side: str = "outputs") -> list[str]:
        return [t["name"] for t in self.manifest["graphs"][graph][side]]

    def predict(self, texts: list[str]) -> list[dict]:
        """One JSON-ready dict per text: label and score, tags per token, or the embedding."""
        inputs = self.encode(texts)
        out = self.run(inputs)[0]
        task = self.manifest["task"]
        if task == "classification":
            probs = softmax(out)
            return [{"label": self.labels[int(p.argmax())], "score": float(p.max())} for p in probs]
        if task == "embedding":
            return [{"embedding": v.tolist()} for v in out]
        if task == "token-classification":
            real = inputs["attention_mask"].astype(bool)
            return [
                {"tags": [self.labels[int(i)] for i in row[m].argmax(-1)]}
                for row, m in zip(out, real, strict=True)
            ]
        return [{"output": v.tolist()} for v in out]

    def generate(self, prompts: list[list[int]], max_new_tokens: int, eos: list[int] = ()) -> list[list[int]]:
        """Greedy tokens after each prompt (left-padded batch), the KV cache fed back at every step;
        a row stops at an end token (kept) and gets no more tokens."""
        cache = self.manifest["cache"]
        B, width = len(prompts), max(len(p) for p in prompts)
        ids = np.full((B, width), self.pad_id, dtype=np.int64)
        mask = np.zeros((B, width), dtype=np.int64)
        for row, p in enumerate(prompts):
            ids[row, width - len(p) :], mask[row, width - len(p) :] = p, 1
        positions = np.clip(mask.cumsum(-1) - 1, 0, None)  # (B, T) from 0 at each first real token
        empty = np.zeros((B, cache["kv_heads"], 0, cache["head_dim"]), dtype=np.float32)
        past = {f"past_key_values.{i}.{kv}": empty for i in range(cache["layers"]) for kv in ("key", "value")}
        new: list[list[int]] = [[] for _ in range(B)]
        done = np.zeros(B, dtype=bool)
        for _ in range(max_new_tokens):
            logits, *present = self.run(
                {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **past}
            )
            token = logits[:, -1].argmax(-1)  # (B,)
            for row in np.flatnonzero(~done):
                new[row].append(int(token[row]))
            done |= np.isin(token, list(eos))
            if done.all():
                break
            past = dict(zip(past, present, strict=True))
            ids = token[:, None].astype(np.int64)  # (B, 1)
            mask = np.concatenate([mask, np.ones((B, 1), dtype=np.int64)], axis=1)
            positions = positions[:, -1:] + 1
        return new

    def generate_seq2seq(
        self,
        source: dict[str, np.ndarray],
        max_new_tokens: int,
        eos: list[int] = (),
        start: list[int] | None = None,
        forced_bos: int | None = None,
        forced_eos: int | list[int] | None = None,
        suppress: list[int] = (),
        begin_suppress: list[int] = (),
    ) -> list[list[int]]:
        """An encoder-decoder's greedy tokens for each row of ``source`` (input_ids and attention_mask,
        or input_features): the encoder once, then the decoder from ``start`` (default: the config's
        decoder_start_token_id; Whisper's: its prompt, <|startoftranscript|> <|en|> <|transcribe|>
        <|notimestamps|>) with its cache; the end token kept, then the row stops. ``forced_bos``
        is the first new token, ``forced_eos`` (one of) the last, as config.json's
        forced_bos_token_id / forced_eos_token_id ask (mBART's language, BART's end). ``suppress``:
        tokens never generated, ``begin_suppress``: not as the first new token (Whisper's
        generation_config.json: suppress_tokens, begin_suppress_tokens)."""
        cache = self.manifest["cache"]
        encoded = dict(zip(self.graph_names("encoder"), self.run(source, "encoder"), strict=True))
        fixed = {k: v for k, v in encoded.items() if k.startswith("cross.")}
        if "encoder_attention_mask" in self.graph_names("decoder", "inputs"):
            fixed["encoder_attention_mask"] = source["attention_mask"]
        B = next(iter(source.values())).shape[0]
        first = start if start is not None else [cache["decoder_start_token_id"]]
        ids = np.array([first] * B, dtype=np.int64)  # (B, T)
        empty = np.zeros((B, cache["kv_heads"], 0, cache["head_dim"]), dtype=np.float32)
        past = {f"past_key_values.{i}.{kv}": empty for i in range(cache["layers"]) for kv in ("key", "value")}
        new: list[list[int]] = [[] for _ in range(B)]
        done = np.zeros(B, dtype=bool)
        for step in range(max_new_tokens):
            logits, *present = self.run({"decoder_input_ids": ids, **fixed, **past}, "decoder")
            scores = logits[:, -1]  # (B, V)
            banned = [*suppress, *(begin_suppress if step == 0 else ())]
            if banned:
                scores = scores.copy()
                scores[:, banned] = -np.inf
            allowed = None
            if step == 0 and forced_bos is not None and len(first) == 1:
                allowed = [forced_bos]
            elif step == max_new_tokens - 1 and forced_eos is not None:
                allowed = forced_eos if isinstance(forced_eos, list) else [forced_eos]
            if allowed is None:
                token = scores.argmax(-1)  # (B,)
            else:  # the best of the forced tokens
                token = np.asarray(allowed)[scores[:, allowed].argmax(-1)]
            for row in np.flatnonzero(~done):
                new[row].append(int(token[row]))
            done |= np.isin(token, list(eos))
            if done.all():
                break
            past = dict(zip(past, present, strict=True))
            ids = token[:, None].astype(np.int64)  # (B, 1)
        return new


def empty_row(inputs: dict[str, np.ndarray]) -> int | None:
    """The first row of ``attention_mask`` with no real token, if any: refused, as it means nothing.
    graft's model (and transformers' sdpa attention) gives such a row zero attention, ONNX Runtime's
    fused attention (--optimize) and transformers' eager attention uniform attention over its padding;
    a tokenizer gives even an empty text its special tokens, so only a hand-made mask has one."""
    mask = inputs.get("attention_mask")
    if mask is None or mask.ndim != 2:
        return None
    empty = np.flatnonzero(~mask.astype(bool).any(1))
    return int(empty[0]) if empty.size else None


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def main(argv: list[str]) -> None:
    folder, rest = argv[0], argv[1:]
    model = Exported(folder)
    if rest[:1] == ["--generate"]:
        steps, texts = int(rest[1]), rest[2:]
        eos = model.config.get("eos_token_id")
        eos = eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else []
        if "decoder" in model.sessions:  # an encoder-decoder: the texts are the sources
            forced = {
                "forced_bos": model.config.get("forced_bos_token_id"),
                "forced_eos": model.config.get("forced_eos_token_id"),
            }
            generated = model.generate_seq2seq(model.encode(texts), steps, eos, **forced)
        else:
            generated = model.generate([model.tokenizer.encode(t).ids for t in texts], steps, eos)
        for text, tokens in zip(texts, generated, strict=True):
            print(json.dumps({"text": text, "tokens": tokens, "generated": model.tokenizer.decode(tokens)}))
        return
    for text, prediction in zip(rest, model.predict(rest), strict=True):
        print(json.dumps({"text": text, **prediction}))


if __name__ == "__main__":
    main(sys.argv[1:])
