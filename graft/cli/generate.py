"""``graft generate``, ``graft chat`` and ``graft convert``: text generation at the command line (chapter 9)."""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from graft.cli.app import BackendOpt, ReferenceOpt, app
from graft.errors import GraftError

ModelArg = Annotated[str, typer.Argument(help="A Hugging Face-format folder, a Hub id, or a .gguf file.")]


class DType(StrEnum):
    float32 = "float32"
    bfloat16 = "bfloat16"


class Truncation(StrEnum):
    left = "left"
    error = "error"


@contextlib.contextmanager
def model_folder(model: str) -> Iterator[Path]:
    """The model as a HF folder; a GGUF file is converted into a temporary one first."""
    if model.endswith(".gguf"):
        from graft.io.gguf import convert_gguf

        with tempfile.TemporaryDirectory(prefix="graft-gguf-") as tmp:
            yield convert_gguf(model, Path(tmp) / "model")
        return
    from graft.io.hf import resolve

    yield resolve(model)


def load(model: str, dtype: DType, compile: bool = False, reference: bool = False, gguf_q4: bool = False):
    """(causal LM, tokenizer, the folder's generation_config.json); ``reference``: without the kernels;
    ``gguf_q4``: a GGUF file's Q4_0 / Q4_1 linears keep their 4-bit blocks (graft.compress.quantize)."""
    if gguf_q4 and not model.endswith(".gguf"):
        raise GraftError(
            f"--gguf-q4 keeps the 4-bit blocks of a .gguf file; {model} is not one (drop --gguf-q4)"
        )
    if gguf_q4 and compile:
        raise GraftError("--compile does not compile the 4-bit layers of --gguf-q4: drop one of them")
    if compile and reference:  # compiled decoding is one of the kernels
        raise GraftError("--compile runs on graft's kernels, which --reference turns off: drop one of them")
    if compile and dtype is DType.float32:  # the library says the same, in Python's words, after loading
        raise GraftError(
            "--compile is for bfloat16 weights on CPU (float32 decoding runs at the speed of its matrix "
            "multiplies without it): add --dtype bfloat16"
        )
    import torch

    from graft.generation import folder_defaults
    from graft.loading import load_config, load_model
    from graft.tasks import TaskModel
    from graft.tokenizer import Tokenizer

    with model_folder(model) as folder:
        family, _ = load_config(folder)
        task = "seq2seq" if family.encoder_decoder else "causal-lm"  # T5, BART: the encoder reads the prompt
        lm = load_model(folder, task=task, dtype=getattr(torch, dtype.value), kernels=not reference)
        tokenizer = Tokenizer.from_folder(folder)
        defaults = folder_defaults(folder)
    if gguf_q4:
        from graft.compress.quantize import keep_gguf_4bit

        keep_gguf_4bit(lm, model)
    if not isinstance(lm, TaskModel) or not (family.encoder_decoder or lm.config.causal):
        raise GraftError(f"{model}: a {lm.config.family} model cannot generate text (it is not a decoder)")
    return lm, tokenizer, defaults


def generation_config(lm, tokenizer, defaults: dict[str, Any], **options: Any):
    """The checkpoint's generation settings, then the command line's (None = not given)."""
    from graft.generation import GenerationConfig

    config = GenerationConfig.for_model(lm, defaults)
    if config.eos_token_id is None and tokenizer.eos_token_id is not None:
        config = config.replace(eos_token_id=tokenizer.eos_token_id)
    if tokenizer.pad_token_id is not None:
        config = config.replace(pad_token_id=tokenizer.pad_token_id)
    temperature = options.pop("temperature")
    if temperature is not None:  # --temperature 0 means greedy
        options["do_sample"] = temperature > 0
        if temperature > 0:
            options["temperature"] = temperature
    elif any(options.get(k) is not None for k in ("top_k", "top_p", "min_p")):
        options["do_sample"] = True
    return config.replace(**{k: v for k, v in options.items() if v is not None})


def write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def reply(lm, tokenizer, ids, mask, config) -> str:
    """Stream one completion to stdout and return it."""
    from graft.generation import stream, stream_text

    tokens = (int(t[0]) for t in stream(lm, ids, mask, config, tokenizer))
    pieces = []
    for piece in stream_text(tokenizer, tokens, stop_at=config.eos_ids):
        write(piece)
        pieces.append(piece)
    write("\n")
    return "".join(pieces)


MAX_NEW_TOKENS = 64  # graft generate's, when neither -n nor generation_config.json says
MaxNew = Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, help="How many tokens to add at most.")]
Temperature = Annotated[float | None, typer.Option(min=0.0, help="Sample at this temperature; 0 = greedy.")]
TopK = Annotated[int | None, typer.Option(min=0, help="Sample among the k most likely tokens.")]
TopP = Annotated[
    float | None, typer.Option(min=0.0, max=1.0, help="Nucleus sampling: smallest set with mass p.")
]
MinP = Annotated[float | None, typer.Option(min=0.0, max=1.0, help="Drop tokens below min-p x the best one.")]
Penalty = Annotated[float | None, typer.Option(min=0.0, help="> 1 discourages repeating tokens.")]
Presence = Annotated[
    float | None,
    typer.Option(min=-2.0, max=2.0, help="OpenAI's: off each token already generated (> 0: new topics)."),
]
Frequency = Annotated[
    float | None,
    typer.Option(min=-2.0, max=2.0, help="OpenAI's: off each token times its count in the new text."),
]
Seed = Annotated[int | None, typer.Option(help="Seed for sampling (reproducible output).")]
Stop = Annotated[list[str] | None, typer.Option("--stop", help="Stop after this text (repeatable).")]
DTypeOpt = Annotated[DType, typer.Option("--dtype", help="Weights in float32 or bfloat16.")]
TruncOpt = Annotated[
    Truncation, typer.Option(help="A prompt too long for the context: cut it from the left (warn) or stop.")
]
System = Annotated[str | None, typer.Option(help="A system message (with --chat).")]
Compile = Annotated[
    bool,
    typer.Option(
        "--compile",
        help="Compile the decoding step first (bfloat16 on CPU): a minute or so once, then each token "
        "at the speed of its matrix multiplies.",
    ),
]

JsonSchema = Annotated[
    str | None,
    typer.Option(
        "--json-schema",
        help="The reply is JSON matching this schema: a .json file or the schema itself ('{}': any JSON; "
        "needs llguidance).",
    ),
]
Regex = Annotated[
    str | None, typer.Option(help="The reply matches this regular expression (needs llguidance).")
]
Grammar = Annotated[
    Path | None,
    typer.Option(help="The reply matches this Lark grammar file (llguidance's Lark; needs llguidance)."),
]


def constraint_options(json_schema: str | None, regex: str | None, grammar: Path | None) -> dict[str, Any]:
    """GenerationConfig's json_schema, regex and grammar from the command line's (a file read, JSON parsed)."""
    options: dict[str, Any] = {"regex": regex}
    if json_schema is not None:
        text, where = json_schema, "--json-schema"
        if not json_schema.lstrip().startswith("{"):
            where = json_schema
            if not Path(json_schema).is_file():
                raise GraftError(
                    f"--json-schema {json_schema}: no such file (or give the schema itself, '{{...}}')"
                )
            text = Path(json_schema).read_text()
        try:
            options["json_schema"] = json.loads(text)
        except json.JSONDecodeError as e:
            raise GraftError(f"{where}: not JSON: {e}") from None
        if not isinstance(options["json_schema"], dict):
            raise GraftError(
                f"{where}: a JSON schema is an object, not {type(options['json_schema']).__name__}"
            )
    if grammar is not None:
        if not grammar.is_file():
            raise GraftError(f"--grammar {grammar}: no such file")
        options["grammar"] = grammar.read_text()
    return options


GGUFQ4 = Annotated[
    bool,
    typer.Option(
        "--gguf-q4",
        help="A .gguf file's Q4_0/Q4_1 layers stay 4-bit (an eighth of float32's bytes; other types are "
        "dequantized as usual).",
    ),
]


@app.command()
def generate(
    model: ModelArg,
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="The prompt (repeatable: a batch).")],
    chat: Annotated[
        bool, typer.Option(help="Format the prompt with the checkpoint's chat template.")
    ] = False,
    system: System = None,
    max_new_tokens: Annotated[
        int | None,
        typer.Option(
            "--max-new-tokens",
            "-n",
            min=1,
            help=f"How many tokens to add at most (default: generation_config.json's max_new_tokens, else {MAX_NEW_TOKENS}).",
        ),
    ] = None,
    temperature: Temperature = None,
    top_k: TopK = None,
    top_p: TopP = None,
    min_p: MinP = None,
    repetition_penalty: Penalty = None,
    presence_penalty: Presence = None,
    frequency_penalty: Frequency = None,
    num_beams: Annotated[int, typer.Option(min=1, help="Beam search with this many beams.")] = 1,
    length_penalty: Annotated[float, typer.Option(help="Beam scores are divided by length ** this.")] = 1.0,
    seed: Seed = None,
    stop: Stop = None,
    json_schema: JsonSchema = None,
    regex: Regex = None,
    grammar: Grammar = None,
    truncation: TruncOpt = Truncation.left,
    dtype: DTypeOpt = DType.float32,
    compile: Compile = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON line per prompt instead.")] = False,
    reference: ReferenceOpt = False,
    backend: BackendOpt = None,
    gguf_q4: GGUFQ4 = False,
) -> None:
    """Continue a prompt (or answer it, with --chat), streaming the new text to stdout."""
    from graft.export.backend import is_exported, load_exported
    from graft.generation import encode_prompts, folder_defaults
    from graft.generation import generate as run

    constraints = constraint_options(json_schema, regex, grammar)  # a bad file fails before the model loads
    exported = backend is not None or is_exported(model)
    if exported and gguf_q4:
        raise GraftError(
            "--gguf-q4 keeps a .gguf file's 4-bit blocks; --backend runs an exported folder: drop one"
        )
    if exported:  # a graft export folder: greedy decoding with the KV cache, in ONNX Runtime or torch
        from graft.tokenizer import Tokenizer

        lm, tokenizer = load_exported(model, backend), Tokenizer.from_folder(model)
        defaults = folder_defaults(model)  # the source's generation_config.json, copied by graft export
        sampling = temperature is not None or any(v is not None for v in (top_k, top_p, min_p))
        if defaults.get("do_sample") and not sampling:
            raise GraftError(
                f"{Path(model) / 'generation_config.json'}: do_sample is true, and an exported model "
                "generates greedily: add --temperature 0"
            )
    else:
        lm, tokenizer, defaults = load(model, dtype, compile, reference, gguf_q4)
    if max_new_tokens is None:  # the checkpoint's own limit, else graft's
        max_new_tokens = defaults.get("max_new_tokens") or MAX_NEW_TOKENS
    config = generation_config(
        lm, tokenizer, defaults, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        min_p=min_p, repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty, num_beams=num_beams, length_penalty=length_penalty,
        seed=seed, stop_strings=stop, truncation=truncation.value, compile=compile,
        **constraints,
    )  # fmt: skip
    if chat:
        head = [{"role": "system", "content": system}] if system else []
        prompts: list[Any] = [[*head, {"role": "user", "content": p}] for p in prompt]
    else:
        prompts = list(prompt)
    seq2seq = getattr(lm, "task", None) == "seq2seq"  # the encoder reads the prompt (padded on the right)
    ids, mask = encode_prompts(tokenizer, prompts, chat=chat, side="right" if seq2seq else "left")
    if exported:
        rows = lm.generate_greedy(ids, mask, config)
    elif len(prompt) == 1 and num_beams == 1 and not as_json:
        reply(lm, tokenizer, ids, mask, config)
        return
    else:  # the decoder's new tokens: after its start token (seq2seq) or after the prompt
        rows = run(lm, ids, mask, config, tokenizer)[:, 1 if seq2seq else ids.shape[1] :].tolist()
    for text, row in zip(prompt, rows, strict=True):
        ends = [i for i, t in enumerate(row) if t in config.eos_ids]
        completion = tokenizer.decode(row[: ends[0]] if ends else row)
        write(json.dumps({"prompt": text, "completion": completion}) + "\n" if as_json else completion + "\n")


@app.command()
def chat(
    model: ModelArg,
    system: System = None,
    max_new_tokens: MaxNew = 256,
    temperature: Temperature = None,
    top_k: TopK = None,
    top_p: TopP = None,
    min_p: MinP = None,
    repetition_penalty: Penalty = None,
    presence_penalty: Presence = None,
    frequency_penalty: Frequency = None,
    seed: Seed = None,
    dtype: DTypeOpt = DType.float32,
    compile: Compile = False,
    reference: ReferenceOpt = False,
) -> None:
    """Talk with a chat model: one message per line; /reset forgets the conversation, /exit (or Ctrl-D) quits."""
    from graft.generation import encode_prompts

    lm, tokenizer, defaults = load(model, dtype, compile, reference)
    if not tokenizer.chat_template:
        raise GraftError(f"{model}: the tokenizer has no chat template, so it cannot chat")
    config = generation_config(
        lm, tokenizer, defaults, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        min_p=min_p, repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty, seed=seed, truncation="left", compile=compile,
    )  # fmt: skip
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            write("> ")
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            messages = list(start)
            continue
        messages.append({"role": "user", "content": text})
        ids, mask = encode_prompts(tokenizer, [messages], chat=True)
        messages.append({"role": "assistant", "content": reply(lm, tokenizer, ids, mask, config)})


@app.command()
def convert(
    file: Annotated[
        Path, typer.Argument(help="A GGUF file (llama architecture) or a CTranslate2 model.bin (Whisper).")
    ],
    out: Annotated[Path, typer.Argument(help="The Hugging Face-format folder to write.")],
    dtype: DTypeOpt = DType.float32,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT when it is not empty.")] = False,
) -> None:
    """Write a GGUF file or a CTranslate2 model as a Hugging Face folder that transformers loads."""
    import torch

    from graft.io.atomic import check_output
    from graft.io.ctranslate2 import convert_ctranslate2
    from graft.io.gguf import convert_gguf

    check_output(out, "OUT", folder=True, overwrite=overwrite)
    if file.is_dir() and (file / "model.bin").is_file():  # a faster-whisper model folder
        file = file / "model.bin"
    ctranslate2 = file.suffix == ".bin" and file.is_file()  # CTranslate2's name; GGUF files start b"GGUF"
    convert_file = convert_ctranslate2 if ctranslate2 else convert_gguf
    folder = convert_file(file, out, dtype=getattr(torch, dtype.value), overwrite=overwrite)
    typer.echo(f"wrote {folder}")
