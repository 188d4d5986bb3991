"""The runtime switch: an exported folder runs ``graft predict``, ``eval``, ``embed``, ``generate`` and
``transcribe``.

    model = load_exported("out/", backend="onnx")      # None: the folder's own format
    model(**batch).logits                               # as a TaskModel's forward, from the file

``ExportedModel`` offers what those commands call on a torch model: ``task``, ``config``, a
``head`` rebuilt from config.json (on the meta device: only its collate, postprocess and evaluate
run) and a forward on the batch's tensors. The file runs in ONNX Runtime (onnx) or torch
(torchscript, exported-program); generation is greedy with the KV cache fed back at every step,
the loop of OUT/runtime.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graft.errors import GraftError
from graft.export.runtime import Exported, empty_row
from graft.generation.speech import Transcriber
from graft.tasks import HEADS
from graft.tasks.base import TaskOutput

MANIFEST = "manifest.json"
BACKENDS = {"onnx": ("onnx",), "torchscript": ("torchscript", "exported-program")}


def is_exported(folder: str | Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def check_backend(folder: Path, fmt: str, backend: str | None) -> None:
    if backend is None:
        return
    if backend not in BACKENDS:
        raise GraftError(f"--backend {backend}: not one of {', '.join(BACKENDS)}")
    if fmt not in BACKENDS[backend]:
        raise GraftError(
            f"--backend {backend}: {folder} holds a {fmt} export (drop --backend to run it as exported)"
        )


class ExportedModel(Exported):
    """An exported folder as the CLI's task model: a forward from the file and the task's head."""

    def __init__(self, folder: str | Path, backend: str | None = None) -> None:
        from graft.export.pytorch import runner
        from graft.loading import build_body, load_config

        self.folder = Path(folder)
        try:
            self.manifest = json.loads((self.folder / MANIFEST).read_text(encoding="utf-8"))
            fmt, file = self.manifest["format"], self.manifest["file"]
        except (ValueError, KeyError, TypeError) as e:
            raise GraftError(f"{self.folder / MANIFEST}: not a graft export manifest ({e})") from None
        check_backend(self.folder, fmt, backend)
        self.format = fmt
        family, config = load_config(self.folder)
        self.config = config
        self.hf = self.config.hf_config
        self.task = self.manifest["task"]
        self.inputs = [i["name"] for i in self.manifest["inputs"]]
        pad = self.hf.get("pad_token_id")
        self.pad_id = pad if isinstance(pad, int) else 0
        self.head = None
        if self.task in HEADS:
            with torch.device("meta"):  # no weights: the file holds them
                body = build_body(family, config)
                head_class = HEADS[self.task]
                self.head = head_class(body, **head_class.options_from_hf(self.hf)).eval()
        graphs = self.manifest.get("graphs") or {"model": {"file": file, "inputs": self.manifest["inputs"]}}
        self.sessions = {}  # graph name -> a function of numpy inputs, in ONNX Runtime or torch
        for name, graph in graphs.items():
            path, names = self.folder / graph["file"], [i["name"] for i in graph["inputs"]]
            if fmt == "onnx":
                from graft.export.onnx import runner as onnx_runner

                self.sessions[name] = onnx_runner(path)
            else:
                self.sessions[name] = runner(fmt, path, names)

    def run(self, inputs: dict[str, np.ndarray], graph: str | None = None) -> list[np.ndarray]:
        row = empty_row(inputs)  # the same refusal as runtime.py's, in graft's words
        if row is not None:
            raise GraftError(
                f"{self.folder}: attention_mask row {row} is all zeros: an input with no real token has no output"
            )
        run = self.sessions[graph] if graph is not None else next(iter(self.sessions.values()))
        return run(inputs)

    def __call__(self, **batch: Any) -> TaskOutput:
        inputs = {}
        for name in self.inputs:
            value = batch.get(name)
            if value is None and name == "token_type_ids":
                value = torch.zeros_like(batch["input_ids"])
            if value is None:
                raise GraftError(f"{self.folder}: the exported graph needs {name}, which the batch lacks")
            inputs[name] = value.cpu().numpy()
        return TaskOutput(torch.from_numpy(np.asarray(self.run(inputs)[0])))

    def predict(
        self,
        tokenizer: Any,
        records: Iterable[dict[str, Any]],
        batch_size: int = 32,
        max_length: int | None = None,
        **options: Any,
    ) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """(record, prediction) pairs, as graft.tasks.predict.predict gives them for a torch model."""
        from graft.tasks.predict import batches

        if self.head is None:
            raise GraftError(f"{self.folder}: an exported {self.task} model has no task head to predict with")
        for chunk in batches(records, batch_size):
            batch = self.head.collate(chunk, tokenizer, max_length)
            logits = self(**batch).logits
            yield from zip(chunk, self.head.postprocess(logits, batch, **options), strict=True)

    def embed(
        self,
        tokenizer: Any,
        texts: list[str],
        batch_size: int = 256,
        max_length: int | None = None,
        normalize: bool = False,
    ) -> torch.Tensor:
        """(N, H) embeddings as graft embed computes them: the mean of the last hidden states over real
        tokens (a bare body's export), or the graph's own sentence embedding (an embedding export)."""
        from graft.tasks.collate import window
        from graft.tasks.pooling import mean_pool

        if "text" in self.sessions:  # a dual encoder (CLIP): its text graph, tokenized as graft does
            return self.embed_text(tokenizer, texts, batch_size, max_length, normalize)
        if self.task not in ("base", "embedding"):
            raise GraftError(
                f"{self.folder}: an exported {self.task} model gives no embeddings (export the base model)"
            )
        limit = window(self.config, tokenizer, max_length)
        out = []
        for start in range(0, len(texts), batch_size):
            enc = tokenizer.encode(texts[start : start + batch_size], max_length=limit)
            batch = {
                "input_ids": enc.input_ids,
                "attention_mask": enc.attention_mask,
                "token_type_ids": enc.token_type_ids,
            }
            hidden = self(**batch).logits  # (B, T, H) or (B, H)
            out.append(mean_pool(hidden, enc.attention_mask) if self.task == "base" else hidden)
        vectors = torch.cat(out).float()
        return torch.nn.functional.normalize(vectors, dim=-1) if normalize else vectors

    def embed_text(
        self, tokenizer: Any, texts: list[str], batch_size: int, max_length: int | None, normalize: bool
    ) -> torch.Tensor:
        """(N, P) a dual encoder's text embeddings, as graft.tasks.image_text.encode_texts."""
        from graft.tasks.image_text import text_inputs

        out = []
        for start in range(0, len(texts), batch_size):
            inputs = text_inputs(self.config, tokenizer, texts[start : start + batch_size], max_length)
            out.append(torch.from_numpy(self.run({k: v.numpy() for k, v in inputs.items()}, "text")[0]))
        vectors = torch.cat(out).float()  # (N, P)
        return torch.nn.functional.normalize(vectors, dim=-1) if normalize else vectors

    def generate_greedy(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor | None,
        config: Any,
        input_features: torch.Tensor | None = None,
    ) -> list[list[int]]:
        """New tokens per row of a left-padded prompt batch (ids, mask), greedy, the end token kept;
        a GenerationConfig asking for more than greedy decoding is refused in one line. An
        encoder-decoder reads the (right-padded) batch as its source: the tokens after its start token.
        Whisper reads ``input_features`` (B, mel bins, frames), and ``ids`` (B, P) are the decoder's
        first tokens (its prompt, the same in every row): the tokens after them."""
        if self.task not in ("causal-lm", "seq2seq"):
            raise GraftError(f"{self.folder}: an exported {self.task} model cannot generate text")
        check_greedy(config, self.task)
        if self.task == "seq2seq":
            if input_features is not None:
                source, start = {"input_features": input_features.numpy()}, ids[0].tolist()
            else:
                source, start = {"input_ids": ids.numpy(), "attention_mask": mask.long().numpy()}, None
            return self.generate_seq2seq(
                source,
                config.max_new_tokens,
                config.eos_ids,
                start=start,
                forced_bos=config.forced_bos_token_id,
                forced_eos=config.forced_eos_token_id,
                suppress=config.suppress_tokens or [],
                begin_suppress=config.begin_suppress_tokens or [],
            )
        prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]
        return self.generate(prompts, config.max_new_tokens, config.eos_ids)


def check_greedy(config: Any, task: str) -> None:
    """Refuse, in one line, a GenerationConfig asking an exported ``task`` model for more than greedy
    decoding (an encoder-decoder's loop also suppresses tokens, as Whisper's generation_config.json asks)."""
    asked = [
        flag
        for flag, on in (
            ("--temperature/--top-k/--top-p/--min-p (sampling)", config.do_sample),
            ("--num-beams", config.num_beams > 1),
            ("--repetition-penalty", config.repetition_penalty not in (None, 1.0)),
            (
                "--presence-penalty/--frequency-penalty",
                bool(config.presence_penalty or config.frequency_penalty),
            ),
            ("logit_bias", bool(config.logit_bias)),
            ("--json-schema/--regex/--grammar", config.constrained),
            ("--stop", bool(config.stop_strings)),
            ("no_repeat_ngram_size", bool(config.no_repeat_ngram_size)),
            ("min_new_tokens", bool(config.min_new_tokens)),
            (
                "suppress_tokens",
                task != "seq2seq" and bool(config.suppress_tokens or config.begin_suppress_tokens),
            ),
        )
        if on
    ]
    if asked:
        raise GraftError(f"{asked[0]}: an exported model generates greedily; run the model folder for that")


class ExportedTranscriber(Transcriber):
    """graft's Transcriber (30-second windows, log-mel features, the language and task prompt, the
    folder's generation_config.json) on an exported Whisper folder: its encoder and decoder graphs
    decode each window greedily, with the KV cache. The folder is the export's: graft export copies
    generation_config.json and preprocessor_config.json into it (or writes the feature extractor's)."""

    def __init__(self, model: ExportedModel, folder: str | Path, **options: Any) -> None:
        super().__init__(model, folder, **options)
        check_greedy(self.config, model.task)  # before any audio is read

    def decode(self, prompt: torch.Tensor, features: torch.Tensor, config: Any) -> list[list[int]]:
        return self.model.generate_greedy(prompt, None, config, input_features=features)

    def detect(self, features: torch.Tensor) -> list[str]:
        if not self.prompt.languages:
            return ["en"] * features.shape[0]
        raise GraftError(
            "--language auto: an exported Whisper folder decodes in the language it is given; name it "
            "(--language en), or run the model folder it was exported from"
        )


def load_exported(folder: str | Path, backend: str | None = None) -> ExportedModel:
    """The exported folder ``folder``; ``backend`` (onnx, torchscript) must match its format."""
    if not is_exported(folder):
        raise GraftError(
            f"--backend {backend}: {folder} is not an exported folder (no {MANIFEST}); graft export it first"
        )
    return ExportedModel(folder, backend)


def predictor(model: Any):
    """The predict loop for ``model``: graft.tasks.predict.predict, or an exported model's own."""
    if isinstance(model, ExportedModel):
        return model.predict
    from graft.tasks.predict import predict

    return lambda tokenizer, records, *args, **kw: predict(model, tokenizer, records, *args, **kw)


__all__ = ["BACKENDS", "ExportedModel", "ExportedTranscriber", "is_exported", "load_exported", "predictor"]
