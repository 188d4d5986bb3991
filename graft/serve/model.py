"""The model a server holds: loaded once from whatever graft loads, with its tokenizer and task.

The backend is torch (a model folder, run folder, adapter or GGUF file) or the runtime of a graft
export folder (ONNX Runtime, or torch for TorchScript), chosen as ``graft predict`` chooses it: a
folder with a manifest.json is an export, unless ``--backend`` says otherwise.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graft.errors import GraftError, did_you_mean
from graft.nn.dual_encoder import DualEncoderConfig
from graft.tasks import TaskModel

ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class Served:
    """One loaded model shared by every request: the model, its tokenizer, what it does (each
    worked out once, at its first request: the event loop asks on every request)."""

    model: Any  # a bare Transformer (task "base"), a TaskModel, or an ExportedModel (an export folder)
    tokenizer: Any
    name: str
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    keep: Any = None  # a temporary folder (a converted GGUF file) that lives as long as the model
    backend: str = "torch"  # or the export's format: onnx, torchscript, exported-program
    transcriber: Any = None  # a Whisper model's graft.generation.speech.Transcriber (speech to text)
    processor: Any = None  # an image model's ImageProcessor; CLIP's ImageTextProcessor (and tokenizer)

    @property
    def exported(self) -> bool:
        return self.backend != "torch"

    @cached_property
    def task(self) -> str:
        if self.transcriber is not None:
            return "automatic-speech-recognition"  # (transformers' pipelines' names)
        if self.clip:
            return "zero-shot-image-classification"
        return self.model.task if isinstance(self.model, TaskModel) or self.exported else "base"

    @property
    def body(self) -> nn.Module:
        if self.exported:
            raise GraftError(f"{self.name}: an exported model has no torch body")
        return self.model.body if isinstance(self.model, TaskModel) else self.model

    @cached_property
    def config(self):
        return self.model.config if self.exported else self.body.config

    @cached_property
    def generates(self) -> bool:
        """A causal LM: served by continuous batching; every other model by the token-budget queue."""
        return self.task == "causal-lm"

    @cached_property
    def seq2seq(self) -> bool:
        """An encoder-decoder over text (T5, BART): its generations batched by the token-budget queue."""
        return self.task == "seq2seq"

    @property
    def kind(self) -> str:
        """What the model is, in a message: 'a causal LM', 'a seq2seq model', 'a classification model'."""
        kinds = {"causal-lm": "a causal LM", "seq2seq": "a seq2seq model", "automatic-speech-recognition": "a speech model"}  # fmt: skip
        return kinds.get(self.task, f"a {self.task} model")

    @cached_property
    def reads_text(self) -> bool:
        """An encoder over text (embeddings, /predict's tasks), served by the token-budget queue."""
        return not (
            self.generates or self.seq2seq or self.transcriber is not None or self.processor is not None
        )

    @cached_property
    def clip(self) -> bool:
        """A dual encoder (CLIP): texts' and images' embeddings, zero-shot image classification."""
        return isinstance(self.config, DualEncoderConfig)

    @property
    def max_length(self) -> int:
        """Tokens one input may hold: the model's window (an encoder-decoder's: its encoder's)."""
        from graft.tasks.collate import window

        cfg = self.config.text if self.clip else getattr(self.config, "encoder", self.config)
        prompt = 0 if self.exported else getattr(self.body, "virtual_tokens", 0)  # prefix/prompt tuning's
        return window(cfg, None) - prompt  # (the positions alone: not the tokenizer's limit)

    @property
    def labels(self) -> list[str] | None:
        head = getattr(self.model, "head", None)
        id2label = getattr(head, "id2label", None)
        if not id2label:
            return None
        return [str(id2label[i]) for i in sorted(id2label)] if isinstance(id2label, dict) else list(id2label)

    def info(self) -> dict[str, Any]:
        cfg = self.config
        if self.exported:  # the weights are in the file: the manifest says what it holds
            manifest = self.model.manifest
            parameters = None
            dtype = "int8" if manifest.get("int8") else manifest["outputs"][0]["dtype"]
        else:
            parameters = sum(p.numel() for p in self.model.parameters())
            dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        return {
            "model": self.name,
            "family": cfg.family,
            "task": self.task,
            "backend": self.backend,
            "labels": self.labels,
            "max_length": self.max_length,
            "hidden_size": cfg.projection_dim if self.clip else getattr(cfg, "decoder", cfg).hidden_size,
            "parameters": parameters,
            "dtype": dtype,
            "chat": bool(getattr(self.tokenizer, "chat_template", None)),
        }


def model_folder(path: Path) -> Path:
    """A run folder (train.output) holds its model in model/; any other folder is the model."""
    if not (path / "config.json").exists() and (path / "model" / "config.json").exists():
        return path / "model"
    return path


BACKENDS = ("torch", "onnx", "torchscript")


def load_served(
    model: str,
    base: str | None = None,
    dtype: torch.dtype | None = None,
    reference: bool = False,
    backend: str | None = None,
) -> Served:
    """Load MODEL as ``graft serve`` does: a HF folder or Hub id, a run folder, a .gguf file, an
    adapter (or strategy checkpoint) folder on top of ``base``, or a graft export folder (``backend``
    None: a folder with a manifest.json is run by its export's runtime; torch: never)."""
    from graft.export.backend import is_exported
    from graft.generation import folder_defaults
    from graft.io.hf import read_json, resolve
    from graft.loading import load_adapter_model, load_model, load_processor, load_trained
    from graft.strategies.checkpoint import META
    from graft.tokenizer import Tokenizer

    check_backend(backend)
    local = Path(model)
    if backend not in (None, "torch") or (backend is None and local.is_dir() and is_exported(local)):
        return load_export(model, backend, base, dtype, reference)
    if backend == "torch" and local.is_dir() and is_exported(local):
        raise GraftError(
            f"--backend torch: {model} is a graft export folder (no torch weights); drop --backend "
            "to run it with its runtime, or serve the model folder it was exported from"
        )
    keep = None
    transcriber = speech_model(model, dtype, reference)
    if transcriber is not None:
        t, keep = transcriber
        return Served(t.model.eval(), t.tokenizer, served_name(model), keep=keep, transcriber=t)
    if model.endswith(".gguf"):
        from graft.io.gguf import convert_gguf

        keep = tempfile.TemporaryDirectory(prefix="graft-serve-gguf-")
        folder = convert_gguf(model, Path(keep.name) / "model")
    else:
        folder = model_folder(resolve(model))
    if (folder / ADAPTER_CONFIG).exists() or (folder / META).exists():
        if base is None:
            base = read_json(folder / ADAPTER_CONFIG, missing_ok=True).get("base_model_name_or_path")
        if not base:
            raise GraftError(f"{folder}: an adapter or strategy checkpoint; give its base model with --base")
        base_folder = model_folder(resolve(base))
        if (folder / ADAPTER_CONFIG).exists():
            m = load_adapter_model(base_folder, folder)
        else:
            m = load_trained(base_folder, folder)
        if dtype is not None:
            m.to(dtype=dtype)
        if not reference:
            import graft.kernels

            graft.kernels.optimize(m)
        has_tokenizer = any(
            (folder / f).exists() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")
        )
        tokenizer = Tokenizer.from_folder(folder if has_tokenizer else base_folder)
    else:
        task = "causal-lm" if _is_decoder(folder) else None
        m = load_model(folder, task=task, dtype=dtype, kernels=not reference)
        processor = load_processor(folder)  # a Tokenizer, or an image model's processor
        if not isinstance(processor, Tokenizer):  # ViT's ImageProcessor, CLIP's (a tokenizer and one)
            text = getattr(processor, "tokenizer", None)
            return Served(m.eval(), text, served_name(model), keep=keep, processor=processor)
        tokenizer = processor
    return Served(m.eval(), tokenizer, served_name(model), folder_defaults(folder), keep)


def check_backend(backend: str | None) -> None:
    if backend is not None and backend not in BACKENDS:
        raise GraftError(
            f"--backend {backend}: not one of {', '.join(BACKENDS)}{did_you_mean(backend, BACKENDS)}"
        )


def load_export(
    model: str, backend: str | None, base: str | None, dtype: torch.dtype | None, reference: bool
) -> Served:
    """A graft export folder, run by ONNX Runtime (or torch, for TorchScript): encoders only."""
    from graft.export.backend import load_exported
    from graft.tokenizer import Tokenizer

    flag = f"--backend {backend}" if backend else f"{model} (a graft export folder)"
    for given, option in (
        (base is not None, "--base"),
        (dtype not in (None, torch.float32), "--dtype"),
        (reference, "--reference"),
    ):
        if given:
            raise GraftError(f"{option}: for the torch backend; {flag} runs the exported file as it is")
    exported = load_exported(model, backend)
    if exported.task == "causal-lm":
        raise GraftError(
            f"{flag}: an exported causal LM generates greedily, one batch at a time, and cannot join "
            "graft serve's continuous batching; serve the model folder it was exported from"
        )
    inputs = getattr(exported.config, "inputs", "tokens")
    if exported.task == "seq2seq" or inputs != "tokens":  # (T5, Whisper, ViT, CLIP)
        what = "seq2seq model" if exported.task == "seq2seq" else f"model over {inputs}"
        raise GraftError(
            f"{flag}: graft serve runs an exported encoder over text; this is an exported {what}: "
            "serve the model folder it was exported from"
        )
    return Served(exported, Tokenizer.from_folder(model), served_name(model), backend=exported.format)


def served_name(model: str) -> str:
    """The id /v1/models shows: the folder's name (a run folder's, not its model/ subfolder's)."""
    path = Path(model.rstrip("/"))
    if path.name == "model" and path.parent.name:
        return path.parent.name
    return path.stem if path.suffix == ".gguf" else path.name or model


def _is_decoder(folder: Path) -> bool:
    """A bare decoder checkpoint (e.g. a converted GGUF file) is served as the causal LM it is."""
    from graft.loading import load_config

    _, cfg = load_config(folder)
    return bool(getattr(cfg, "causal", False))  # (an encoder-decoder's config has two stacks)


def speech_model(model: str, dtype: torch.dtype | None, reference: bool) -> tuple[Any, Any] | None:
    """A Whisper model's Transcriber (a HF folder or Hub id, or a CTranslate2 model.bin or
    faster-whisper folder, converted into a temporary folder), and the temporary folder to keep as
    long as the model (None for a HF folder); None for any other model."""
    from graft.generation.speech import Transcriber
    from graft.io.ctranslate2 import convert_ctranslate2, ctranslate2_file
    from graft.io.hf import read_json, resolve
    from graft.loading import load_model

    path, keep = ctranslate2_file(model), None
    if path is not None:
        keep = tempfile.TemporaryDirectory(prefix="graft-serve-ct2-")
        folder = convert_ctranslate2(path, Path(keep.name) / "model")
    else:
        if model.endswith(".gguf"):
            return None
        folder = model_folder(resolve(model))
        if read_json(folder / "config.json", missing_ok=True).get("model_type") != "whisper":
            return None
    whisper = load_model(folder, task="seq2seq", dtype=dtype, kernels=not reference)
    return Transcriber(whisper, folder), keep
