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

What the folder holds: manifest.json lists every input and output (name, dtype, shape with axis
names for the dynamic axes) and, for a decoder, the cache layout: one merged graph whose inputs
are input_ids, attention_mask (past + new positions), position_ids and past_key_values.{i}.key /
.value, and whose outputs are logits and present.{i}.key / .value. The prompt runs with empty past
tensors (B, kv_heads, 0, head_dim); each step feeds one token per row and the previous presents.
Prompts are left-padded and positions count real tokens from 0, as in graft's own generation.
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
        self.session = ort.InferenceSession(
            str(self.folder / self.manifest["file"]), providers=["CPUExecutionProvider"]
        )
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

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, inputs)

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


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def main(argv: list[str]) -> None:
    folder, rest = argv[0], argv[1:]
    model = Exported(folder)
    if rest[:1] == ["--generate"]:
        steps, texts = int(rest[1]), rest[2:]
        prompts = [model.tokenizer.encode(t).ids for t in texts]
        eos = model.config.get("eos_token_id")
        eos = eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else []
        for text, tokens in zip(texts, model.generate(prompts, steps, eos), strict=True):
            print(json.dumps({"text": text, "tokens": tokens, "generated": model.tokenizer.decode(tokens)}))
        return
    for text, prediction in zip(rest, model.predict(rest), strict=True):
        print(json.dumps({"text": text, **prediction}))


if __name__ == "__main__":
    main(sys.argv[1:])
