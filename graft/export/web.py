"""In-browser export (chapter 8): a static folder whose one page runs the model with onnxruntime-web.

    graft export MODEL OUT/ --format web
    python -m http.server -d OUT/ 8080        # any static file server; then open http://127.0.0.1:8080/

OUT/ holds the int8 ONNX graph of ``graft export --int8`` (the same exporter and checks), the
tokenizer, labels.json, config.json, manifest.json, index.html and onnxruntime-web's WebAssembly
runtime. Nothing runs on a server: the page fetches the files, tokenizes in JavaScript (BERT-style
WordPiece, as tokenizers' BertNormalizer + BertPreTokenizer + WordPiece) and runs the graph in the
browser on one thread (threads would need cross-origin isolation headers a plain server lacks).

The page supports classification (a probability bar per label) and embeddings (the cosine
similarity matrix of the texts typed); other tasks and other tokenizers are refused in one line.

onnxruntime-web comes from the npm registry at export time (``npm pack``, pinned to
ORT_WEB_VERSION), once, into $XDG_CACHE_HOME/graft/web: its WebAssembly file is 11 MB, too big to
vendor in graft's repository and the same for every export.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from graft.errors import GraftError
from graft.export.check import Int8Check
from graft.export.graph import task_of
from graft.io.atomic import atomic_folder, write_json

ORT_WEB_VERSION = "1.22.0"
# What the page loads: the WebAssembly-only build, its module loader and the runtime itself.
ORT_WEB_FILES = ("ort.wasm.min.js", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
WEB_TASKS = ("classification", "embedding")
# How far the page may stand from graft's float32 model: the int8 graph moves each probability by
# at most this much, and each embedding keeps a cosine >= graft.export.INT8_MIN_COSINE; against
# onnxruntime on the same int8 graph, the page agrees to RUNTIME_TOLERANCE (WebAssembly's kernels
# differ from the native ones: within 1e-3 on int8 weights exported on a VNNI CPU; 4.0e-3 on the
# uint8 weights exported where the CPU's int8 pairs saturate, graft.export.onnx.quantize_int8).
SCORE_TOLERANCE = 0.05
RUNTIME_TOLERANCE = 5e-3
PAGE = Path(__file__).with_name("web.html")


def check_web(model: nn.Module, tokenizer: Any) -> None:
    """Refuse, in one line and before any work, what the page cannot run."""
    task = task_of(model)
    if task not in WEB_TASKS:
        raise GraftError(
            f"--format web: the page runs {' and '.join(WEB_TASKS)} models, not {task}; "
            "use --format onnx (runtime.py) or graft serve"
        )
    if tokenizer is None:
        raise GraftError("--format web: the model folder has no tokenizer (tokenizer.json or vocab.txt)")
    spec = json.loads(tokenizer.backend.to_str())
    kind = (spec.get("model") or {}).get("type")
    normalizer = (spec.get("normalizer") or {}).get("type")
    pre = (spec.get("pre_tokenizer") or {}).get("type")
    if (kind, normalizer, pre) != ("WordPiece", "BertNormalizer", "BertPreTokenizer"):
        raise GraftError(
            f"--format web: the page tokenizes BERT-style WordPiece only; this tokenizer is {kind} "
            f"(normalizer {normalizer}, pre-tokenizer {pre}); use --format onnx (runtime.py) or graft serve"
        )


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "graft" / "web" / f"onnxruntime-web-{ORT_WEB_VERSION}"


def onnxruntime_web() -> Path:
    """The folder holding ORT_WEB_FILES, fetched with ``npm pack`` the first time."""
    cached = cache_dir()
    if all((cached / name).is_file() for name in ORT_WEB_FILES):
        return cached
    npm = shutil.which("npm")
    if npm is None:
        raise GraftError(
            f"--format web: npm is needed once to fetch onnxruntime-web {ORT_WEB_VERSION} into {cached} "
            "(apt-get install -y npm, or put its dist files there)"
        )
    with tempfile.TemporaryDirectory(prefix="graft-npm-") as work:
        done = subprocess.run(
            [npm, "pack", f"onnxruntime-web@{ORT_WEB_VERSION}", "--silent"],
            cwd=work,
            capture_output=True,
            text=True,
        )
        tarballs = list(Path(work).glob("onnxruntime-web-*.tgz"))
        if done.returncode != 0 or not tarballs:
            last = (done.stderr.strip().splitlines() or ["no tarball written"])[-1]
            raise GraftError(f"--format web: npm pack onnxruntime-web@{ORT_WEB_VERSION} failed: {last}")
        with tarfile.open(tarballs[0]) as tar, atomic_folder(cached) as folder:
            for name in ORT_WEB_FILES:  # only these members, by name: nothing else is extracted
                source = tar.extractfile(f"package/dist/{name}")
                if source is None:
                    raise GraftError(f"--format web: the onnxruntime-web tarball has no dist/{name}")
                (folder / name).write_bytes(source.read())
    return cached


def export_web(
    model: nn.Module,
    out: str | Path,
    tokenizer: Any,
    opset: int | None = None,
    int8_check: Int8Check | None = None,
) -> dict[str, Any]:
    """Export ``model`` as a static in-browser folder at ``out``; its manifest.

    The graph is ``export_model(..., fmt="onnx", int8=True)``'s, parity- and int8-checked (by
    ``int8_check``, a graft.export.Int8Check: --check-data's rows); the folder appears whole or not
    at all.
    """
    from graft.export import MANIFEST, export_model

    check_web(model, tokenizer)
    runtime = onnxruntime_web()  # before the export's minutes: a missing npm fails first
    with tempfile.TemporaryDirectory(prefix="graft-web-") as work:
        onnx_out = Path(work) / "onnx"
        # torchlib's translations (own_ops=False): on graft's own (graft/export/ops.py) this page stood
        # 3.1e-3 off native onnxruntime on a tiny int8 BERT's probabilities, past RUNTIME_TOLERANCE
        # (native ORT differs by as much with and without its SkipLayerNormFusion on that graph;
        # onnxruntime-web 1.22 agreed with native 1.32 on torchlib's graph, not on graft's: not yet
        # understood)
        manifest = export_model(
            model,
            onnx_out,
            tokenizer,
            fmt="onnx",
            opset=opset,
            int8=True,
            int8_check=int8_check,
            own_ops=False,
        )
        with atomic_folder(out) as folder:
            for file in onnx_out.iterdir():
                if file.name not in (MANIFEST, "runtime.py"):  # runtime.py needs Python: not for a page
                    shutil.copyfile(file, folder / file.name)
            for name in ORT_WEB_FILES:
                shutil.copyfile(runtime / name, folder / name)
            shutil.copyfile(PAGE, folder / "index.html")
            manifest["format"] = "web"
            manifest["web"] = {
                "page": "index.html",
                "runtime": f"onnxruntime-web {ORT_WEB_VERSION} (WebAssembly, one thread)",
                "tokenizer": "BERT-style WordPiece in JavaScript",
                "score_tolerance": SCORE_TOLERANCE,
                "runtime_tolerance": RUNTIME_TOLERANCE,
            }
            manifest["files"] = sorted(p.name for p in folder.iterdir()) + [MANIFEST]
            write_json(folder / MANIFEST, manifest)
    return manifest


__all__ = ["ORT_WEB_VERSION", "WEB_TASKS", "check_web", "export_web", "onnxruntime_web"]
