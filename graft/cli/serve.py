"""``graft serve``: one model behind an HTTP API (chapter 8).

    graft serve MODEL [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--max-batch-tokens N]
                      [--max-wait-ms N] [--forward-overhead-tokens N] [--max-concurrent N] [--no-batching] [--workers N]
                      [--prefix-cache-mb N] [--chat-template FILE] [--tool-format hermes|llama3_json|mistral]
                      [--base BASE]
                      [--backend torch|onnx|torchscript]

OpenAI-compatible /v1/embeddings, /v1/completions, /v1/chat/completions and (Whisper)
/v1/audio/transcriptions, graft's /predict, /embed and /tokenize, /health, /info, /metrics
(Prometheus), /docs, and a playground at /. Encoders, causal LMs, encoder-decoders (T5, BART),
Whisper, image classifiers and CLIP.
SIGTERM (or Ctrl-C) stops taking requests (503), finishes those in flight, then exits.
A graft export folder (graft export MODEL OUT/ --format onnx) is served by ONNX Runtime with the
same endpoints and JSON, as graft predict and embed run it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from graft.cli.app import ReferenceOpt, app
from graft.cli.generate import DType
from graft.errors import GraftError, did_you_mean

ModelArg = Annotated[
    str,
    typer.Argument(
        help="A model folder, a run folder, a Hub id, a .gguf file, or an adapter folder (with --base)."
    ),
]


@app.command()
def serve(
    model: ModelArg,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8000,
    api_key: Annotated[
        str | None, typer.Option("--api-key", help="Require 'Authorization: Bearer KEY' (401 otherwise).")
    ] = None,
    max_batch_tokens: Annotated[
        int, typer.Option(min=1, help="Encoders: most padded tokens in one batched forward.")
    ] = 16384,
    max_wait_ms: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="Encoders: the longest a batch that is not full waits for more after the last answers went "
            "out (it waits only while the clients just answered keep coming back; 0: never waits).",
        ),
    ] = 20.0,
    forward_overhead_tokens: Annotated[
        int,
        typer.Option(
            min=0,
            help="Encoders: split a batch into forwards of similar lengths where a forward costs this many "
            "padded tokens (about 30 for MiniLM; 0: one forward per batch).",
        ),
    ] = 0,
    max_concurrent: Annotated[
        int, typer.Option(min=1, help="Requests on the model at once (queued or running); more get 429.")
    ] = 256,
    batching: Annotated[
        bool, typer.Option("--batching/--no-batching", help="Batch concurrent requests (off: one at a time).")
    ] = True,
    workers: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Encoders: each batch runs split into N parts of about equal tokens, each on cores / N "
            "torch threads, the next batch starting when all have ended; one request alone runs on "
            "every core (1: whole batches on every core; default 2 where the model runs on torch with "
            "two threads or more).",
        ),
    ] = None,
    prefix_cache_mb: Annotated[
        int,
        typer.Option(
            min=0,
            help="Causal LMs: MiB of recent prompts' keys and values kept, so that a prompt that begins "
            "the same way (a chat's next turn) runs only from where it differs (0: none).",
        ),
    ] = 256,
    chat_template: Annotated[
        Path | None,
        typer.Option(
            "--chat-template",
            help="Causal LMs: a Jinja chat template file used instead of the tokenizer's (as transformers "
            "renders it).",
        ),
    ] = None,
    tool_format: Annotated[
        str | None,
        typer.Option(
            "--tool-format",
            help="Causal LMs: how the model writes tool calls, for tool_choice auto and required: hermes, llama3_json or "
            "mistral (default: the one its chat template names).",
        ),
    ] = None,
    base: Annotated[
        str | None, typer.Option(help="The base model of an adapter or strategy-checkpoint folder.")
    ] = None,
    max_body_bytes: Annotated[int, typer.Option(min=1, help="Largest request body (413 above).")] = 4 << 20,
    dtype: Annotated[DType, typer.Option("--dtype", help="Weights in float32 or bfloat16.")] = DType.float32,
    reference: ReferenceOpt = False,
    backend: Annotated[
        str | None,
        typer.Option(
            help="torch, onnx or torchscript (default: a graft export folder runs with its own runtime)."
        ),
    ] = None,
    ray: Annotated[bool, typer.Option("--ray", help="Run on Ray Serve (pip install 'graft[ray]').")] = False,
    replicas: Annotated[int, typer.Option(min=1, help="--ray: copies of the model behind Ray's proxy.")] = 1,
) -> None:
    """Serve a model over HTTP: OpenAI-compatible endpoints, /predict, /embed, metrics, a playground at /."""
    import torch

    from graft.serve import Settings, load_served
    from graft.serve.model import check_backend
    from graft.serve.server import serve as run
    from graft.serve.tools import FORMATS

    if model.endswith(".gguf") and not Path(model).is_file():
        raise GraftError(f"{model}: no such file")
    check_backend(backend)
    if model.endswith(".gguf") and backend not in (None, "torch"):
        raise GraftError(
            f"--backend {backend}: {model} is a GGUF file (torch only); graft export a folder first"
        )
    template = read_chat_template(chat_template) if chat_template is not None else None
    if tool_format is not None and tool_format not in FORMATS:
        raise GraftError(
            f"--tool-format {tool_format}: not one of {', '.join(FORMATS)}{did_you_mean(tool_format, FORMATS)}"
        )
    settings = Settings(
        api_key=api_key,
        max_batch_tokens=max_batch_tokens,
        max_wait_ms=max_wait_ms,
        forward_overhead_tokens=forward_overhead_tokens,
        max_concurrent=max_concurrent,
        max_body_bytes=max_body_bytes,
        batching=batching,
        workers=workers or 0,
        prefix_cache_mb=prefix_cache_mb,
        tool_format=tool_format,
        freeze_gc=True,  # this process is the server's own
    )

    def loader():
        served = load_served(model, base, getattr(torch, dtype.value), reference, backend)
        if template is not None:
            if not served.generates:
                raise GraftError(f"--chat-template: {served.name} is a {served.task} model; it does not chat")
            served.tokenizer.chat_template = template
        return served

    if ray:
        from graft.serve.ray import serve_on_ray

        serve_on_ray(loader, settings, host, port, replicas)
        return
    if replicas != 1:
        raise GraftError("--replicas: only with --ray (one process serves one copy of the model)")
    run(loader, settings, host, port)


def read_chat_template(path: Path) -> str:
    """A chat template file's text, compiled once here so that a mistake stops the server before
    the model loads (the line it is on)."""
    from graft.tokenizer import _compile_chat_template

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise GraftError(f"--chat-template {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        _compile_chat_template(text)
    except GraftError as e:
        raise GraftError(f"--chat-template {path}: {str(e).removeprefix('chat template: ')}") from None
    return text
