"""Loading and saving whole models: the layer above models, tasks and strategies.

``load_model`` builds any registered family from a Hugging Face folder or Hub id, with its task
head; ``save_model`` writes it back in the HF layout (LoRA merged); ``load_adapter_model`` puts
a PEFT adapter on a base model; ``load_trained`` a strategy-only checkpoint (``save_trained``).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

import graft.kernels
from graft.errors import GraftError, did_you_mean
from graft.io.atomic import write_json
from graft.io.hf import read_config, read_json, read_weights, resolve, weight_shapes, write_weights
from graft.kernels.int4 import METHOD as INT4
from graft.kernels.int4 import Int4Linear, int4_linears, pack_for_cpu, unpack_codes
from graft.kernels.int8 import LEVELS, METHODS, Int8Embedding, Int8Linear, quantize_linears, tied_output
from graft.models.registry import FAMILIES, Family, describe, family_for, pruning_from_hf, pruning_to_hf
from graft.models.weights import WeightMap
from graft.nn import (
    DualEncoder,
    DualEncoderConfig,
    EncoderDecoder,
    EncoderDecoderConfig,
    Transformer,
    TransformerConfig,
)
from graft.strategies import apply_strategy, exportable
from graft.strategies.checkpoint import META, WEIGHTS
from graft.strategies.lora import HEAD_FILE, load_adapter
from graft.tasks import HEADS, TaskModel
from graft.tasks.hf_layout import body_prefix, hf_seq2seq_head
from graft.tasks.image_text import ImageTextProcessor
from graft.tokenizer import Tokenizer
from graft.vision import ImageProcessor

log = logging.getLogger("graft")

Model = Transformer | EncoderDecoder | DualEncoder | TaskModel
Body = Transformer | EncoderDecoder | DualEncoder
AnyConfig = TransformerConfig | EncoderDecoderConfig | DualEncoderConfig


def build_body(family: Family, cfg: AnyConfig) -> Body:
    """The family's body: one stack, an encoder and a decoder (T5, BART, Whisper), or a text and an
    image tower (CLIP)."""
    if family.encoder_decoder:
        return EncoderDecoder(cfg)
    return DualEncoder(cfg) if family.dual_encoder else Transformer(cfg)


def unique_shapes(body: nn.Module) -> dict[str, torch.Size]:
    """Each tensor of the body's state dict once: a table shared by two stacks (T5's and BART's
    token embeddings) is filled under its first name."""
    seen: set[int] = set()
    shapes = {}
    for name, tensor in body.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            shapes[name] = tensor.shape
    return shapes


def load_body(body: Body, state: dict[str, torch.Tensor]) -> None:
    """Load a state dict holding each shared tensor once (as ``unique_shapes`` names them)."""
    missing = [k for k in body.load_state_dict(state, strict=False).missing_keys if k in unique_shapes(body)]
    assert not missing, missing  # WeightMap.to_graft has filled every one of them


def load_config(folder: Path) -> tuple[Family, AnyConfig]:
    path = folder / "config.json"
    hf = read_config(folder)
    try:
        family = family_for(hf.get("model_type"), source=str(path))
        cfg = pruning_from_hf(hf, family.config_from_hf(hf))  # pruned heads and widths: one stack's
        # quantization_config, with this message's path
        check_quantizable(quantization(hf), family, "config.json: quantization_config")
        task_from_architectures(hf, family)  # checks architectures, with this message's path
        return family, cfg
    except GraftError as e:
        message = str(e)
        if message.startswith("config"):  # "config.json: ..." / "config: ..." -> the real path
            message = f"{path}:{message.split(':', 1)[1]}"
        raise GraftError(message) from None
    except (TypeError, ValueError) as e:
        raise GraftError(f"{path}: {e}") from None


def load_processor(folder: str | Path) -> Any:
    """What turns a model's inputs into tensors: its ImageProcessor (preprocessor_config.json, or the
    defaults at the model's image size) for an image model, else its Tokenizer."""
    folder = resolve(folder)
    _, cfg = load_config(folder)
    if isinstance(cfg, DualEncoderConfig):
        return ImageTextProcessor(Tokenizer.from_folder(folder), ImageProcessor.for_model(folder, cfg.vision))
    if isinstance(cfg, TransformerConfig) and cfg.inputs == "patches":
        return ImageProcessor.for_model(folder, cfg)
    return Tokenizer.from_folder(folder)


def task_from_architectures(hf: dict[str, Any], family: Family) -> str:
    """The graft task that the checkpoint's HF class corresponds to (or that graft wrote down)."""
    # a head without a transformers class (embedding) is saved as the base model, with graft_task
    if isinstance(hf.get("graft_task"), str) and hf["graft_task"] in HEADS:
        return hf["graft_task"]
    by_class = {cls: task for task, cls in family.architectures.items()}
    classes = hf.get("architectures") or []
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise GraftError(
            f"config.json: architectures must be a list of class names, found {describe(classes)}"
        )
    for cls in classes:
        if cls in by_class and by_class[cls] in HEADS or by_class.get(cls) == "base":
            return by_class[cls]
    return "causal-lm" if family.decoder else "base"


QUANTIZATION = (*METHODS, INT4)  # graft quantize's methods


def quantization(hf: dict[str, Any]) -> str | None:
    """The method a checkpoint was quantized with by ``graft quantize`` (config.json's
    "quantization_config"), or None for a float checkpoint."""
    qc = hf.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict) or qc.get("quant_method") != "graft":
        found = qc.get("quant_method") if isinstance(qc, dict) else qc
        raise GraftError(
            f"config.json: quantization_config: graft reads only its own quantized checkpoints "
            f'(quant_method "graft"), found {describe(found)}'
        )
    method = qc.get("method")
    if method not in QUANTIZATION:
        raise GraftError(
            f"config.json: quantization_config: method must be one of {', '.join(QUANTIZATION)}, found "
            f"{describe(method)}{did_you_mean(str(method), QUANTIZATION)}"
        )
    return method


def check_quantizable(method: str | None, family: Family, where: str) -> None:
    """int4-weight is for decoding (one stack of blocks and an LM head): other families refuse it,
    the message starting with ``where`` (a file's key, a command-line option)."""
    if method == INT4 and (not family.decoder or family.encoder_decoder or family.dual_encoder):
        raise GraftError(
            f"{where}: {INT4} quantizes decoder-only language models (4-bit weights for decoding), "
            f"not {family.name}: use int8-weight or int8-dynamic"
        )


# decoders' int8-dynamic layers that keep float inputs (int8 weights): those whose input rows have
# outlier channels that one scale per row flattens. Measured on SmolLM2, one kind of projection
# at a time and together (perplexity over fp32 on the last 8,000 characters of Hamlet / Macbeth):
# every input int8 +4.7% / +2.5% (with the attention output's input float, as graft did);
# Q/K/V's input (the normed residual stream) alone +1.3%, the down projection's (the gated
# product) alone +1.8%; the attention output's and gate/up's alone -0.1%; with Q/K/V and down
# float +0.75% / -0.1% (int8-weight -0.1% / +0.0%). Where rows are 7-bit (graft.kernels.int8.LEVELS:
# x86 without VNNI), gate/up's too: on an AMD EPYC 7003, Hamlet +3.5% with gate/up's rows 7-bit,
# +0.2% with only the attention output's.
DYNAMIC_FLOAT_INPUTS = (".attn.q", ".attn.k", ".attn.v", ".ffn.down") + (
    (".ffn.gate", ".ffn.up") if LEVELS < 127 else ()
)


def quantized(body: Body, method: str | None, head: nn.Module | None = None) -> Body:
    """``body`` with the linear layers of its blocks made int8 for ``method`` (in place): every stack's
    (an encoder-decoder's two, cross-attention included, and its context projection; CLIP's two
    towers), and the token tables (one scale per token). An output layer tied to a table (a LM
    head) reads the int8 table (graft.kernels.int8.tied_output): ``head``'s, built on the float
    body, is tied again here; a head built on the quantized body ties itself."""
    if method == INT4:
        return int4_body(body)
    if method is None or METHODS[method] is None:
        return body
    activations = METHODS[method]
    if isinstance(body, EncoderDecoder):
        stacks = {"encoder": body.encoder, "decoder": body.decoder}
    elif isinstance(body, DualEncoder):
        stacks = dict(body.towers)  # the projections into the shared space stay float, as a pooler
    else:
        stacks = {"": body}
    # one-stack decoders: see DYNAMIC_FLOAT_INPUTS
    float_inputs = isinstance(body, Transformer) and FAMILIES[body.config.family].decoder
    tables: dict[int, Int8Embedding] = {}  # the float table's weight -> its int8 table, one for two stacks
    for prefix, stack in stacks.items():
        names = quantize_linears(stack.layers, activations, prefix=f"{prefix}.layers".lstrip("."))
        if float_inputs and activations == "dynamic":
            for name in names:
                if name.endswith(DYNAMIC_FLOAT_INPUTS):
                    body.get_submodule(name).activations = "weight"
        tokens = getattr(stack.embed, "tokens", None)
        if isinstance(tokens, nn.Embedding):
            tables.setdefault(id(tokens.weight), Int8Embedding.from_embedding(tokens))
            stack.embed.tokens = tables[id(tokens.weight)]
    if isinstance(body, EncoderDecoder) and body.project is not None:  # the encoder -> decoder projection
        body.project = Int8Linear.from_linear(body.project, activations)
    for parent in [] if head is None else list(head.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and id(child.weight) in tables:  # tied to a table
                setattr(parent, name, tied_output(tables[id(child.weight)], child))
    return body


def int4_body(body: Body) -> Body:
    """``body``'s block linears as Int4Linear (in place): a decoder's, whose widths the kernel takes."""
    assert isinstance(body, Transformer)  # check_quantizable refused the other bodies
    try:
        int4_linears(body.layers, prefix="layers")
    except ValueError as e:  # a width the 4-bit groups or the kernel's blocks do not divide
        raise GraftError(f"{INT4}: {e}: use int8-weight") from None
    return body


# the int8 weights' per-channel scales; the int4 weights' per-group scales and minimums
QUANT_SUFFIXES = ("_scale", "_min")


def with_scales(wmap: WeightMap, names: set[str] | dict[str, Any]) -> WeightMap:
    """``wmap`` plus the scales (and minimums) of the quantized weights among graft's ``names``: HF
    name "X.weight_scale" for "X.weight", concatenated as their weights are (GPT-2's c_attn)."""
    extra: dict[str, Any] = {}
    for hf_name, target in wmap.names.items():
        targets = target if isinstance(target, tuple) else (target,)
        for suffix in QUANT_SUFFIXES:
            if hf_name.endswith(".weight") and all(t + suffix in names for t in targets):
                found = tuple(t + suffix for t in targets)
                extra[hf_name + suffix] = found if isinstance(target, tuple) else found[0]
    return dataclasses.replace(wmap, names={**wmap.names, **extra}) if extra else wmap


def int4_codes(body: Body, state: dict[str, torch.Tensor], saving: bool) -> None:
    """Int4Linear weights in ``state`` (body names) between the CPU kernel's packed layout, which
    depends on the CPU's vector width (memory), and the portable one (files), in place."""
    for name, module in body.named_modules():
        if isinstance(module, Int4Linear):
            key = f"{name}.weight"
            state[key] = module.codes() if saving else pack_for_cpu(unpack_codes(state[key]))


def weight_map(family: Family, cfg: AnyConfig, task: str) -> WeightMap:
    """The family's weight map, with the body prefix that ``task``'s HF class uses when it differs."""
    wmap = family.weight_map(cfg)
    # one layout per encoder-decoder family, and CLIPModel's
    prefix = None if family.encoder_decoder or family.dual_encoder else body_prefix(cfg, task)
    return dataclasses.replace(wmap, prefix=prefix) if prefix else wmap


def legacy_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Old TF-converted checkpoints call LayerNorm parameters gamma and beta."""
    rename = {".gamma": ".weight", ".beta": ".bias"}
    return {
        next((k[: -len(s)] + r for s, r in rename.items() if k.endswith(s)), k): v for k, v in state.items()
    }


def check_shapes(
    family: Family, cfg: AnyConfig, task: str, shapes: dict[str, tuple[int, ...]], source: Path
) -> None:
    """Every tensor the config implies is in the weights file, with its shape: checked from the
    file's header against a model built on the meta device, before any memory is allocated. A
    config.json saying hidden_size 200000 next to a small file is refused here, where building the
    model first would ask the allocator for 24 GB."""
    state = legacy_names({name: torch.empty(shape, device="meta") for name, shape in shapes.items()})
    if getattr(cfg, "pooler", False) and not any(
        k.startswith("pooler") for k in weight_map(family, cfg, task).split_prefix(state)[0]
    ):
        cfg.pooler = False  # saved from a task model built without the pooler
    try:
        with torch.device("meta"):
            body = quantized(build_body(family, cfg), quantization(cfg.hf_config))
    except (RuntimeError, TypeError, OverflowError) as e:  # sizes beyond int64 or whose product overflows
        reason = str(e).splitlines()[0]  # torch's own first line, without its C++ frames
        raise GraftError(
            f"{source.parent / 'config.json'}: its sizes describe no model that can be built ({reason})"
        ) from None
    expected = unique_shapes(body)
    with_scales(weight_map(family, cfg, task), expected).to_graft(state, expected, str(source))


def untie_output(body: EncoderDecoder, rest: dict[str, torch.Tensor]) -> None:
    """An output layer saved apart from the token table, with other values, is the model's own,
    whatever config.json says (transformers 5 writes tie_word_embeddings: true for every T5)."""
    out = rest.get(f"{hf_seq2seq_head(body.config.family).out}.weight")
    if out is not None and not torch.equal(out, body.decoder.embed.tokens.weight):
        body.config.decoder.tie_word_embeddings = False


def load_model(
    model: str | Path,
    task: str | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    kernels: bool = True,
    to_train: bool = False,
    **options: Any,
) -> Model:
    """A graft model from a HF folder or Hub id: the bare body (task "base") or body + head.

    ``kernels``: run on graft's CPU kernels (graft.kernels.optimize, the default: the speed of
    training, prediction, embedding and generation), or, False, as graft.nn's plain reference.

    The head is built as ``HEADS[task](body, **options)``, its options (labels, problem type...) read
    from config.json and overridden by ``options``. A checkpoint without the head's tensors (a base
    model to fine-tune) gets a freshly initialized head: a warning, unless ``to_train`` says the
    caller is about to train it (then one line of information).
    """
    folder = resolve(model)
    family, cfg = load_config(folder)
    saved_task = task_from_architectures(cfg.hf_config, family)
    check_shapes(family, cfg, saved_task, *weight_shapes(folder))
    state, source = read_weights(folder)
    state = legacy_names(state)

    method = quantization(cfg.hf_config)
    body = quantized(build_body(family, cfg), method)
    expected = unique_shapes(body)
    wmap = with_scales(weight_map(family, cfg, saved_task), expected)
    body_state, rest = wmap.to_graft(state, expected, str(source))
    int4_codes(body, body_state, saving=False)
    load_body(body, body_state)

    task = task or saved_task
    if task == "base":
        result: Model = body
    else:
        if task not in HEADS:
            raise GraftError(f"unknown task {task!r} (known: base, {', '.join(HEADS)})")
        head_class = HEADS[task]
        if family.encoder_decoder and task != "seq2seq":
            raise GraftError(
                f"{task}: a {family.name} model is an encoder-decoder; load it as task seq2seq (or base)"
            )
        if family.dual_encoder and task != "image-text":
            raise GraftError(
                f"{task}: a {family.name} model is a dual encoder; load it as task image-text (or base)"
            )
        if family.encoder_decoder:
            untie_output(body, rest)
        try:
            head = head_class(body, **{**head_class.options_from_hf(cfg.hf_config), **options})
        except TypeError as e:  # an option the head does not take
            raise GraftError(f"{task} head: {e}") from None
        names = head.hf_names()
        for hf_name in head.tied_hf_names():  # copies of a body weight that older checkpoints saved
            rest.pop(hf_name, None)
        found = [hf_name for hf_name in names if hf_name in rest]
        if found:
            missing = [hf_name for hf_name in names if hf_name not in rest]
            if missing:
                raise GraftError(f"{source}: missing tensor {missing[0]!r} for the {task} head")
            head_state = {names[hf_name]: rest.pop(hf_name) for hf_name in names}
            expected = head.state_dict()
            for name, tensor in head_state.items():
                if tensor.shape != expected[name].shape:
                    hf_name = next(k for k, v in names.items() if v == name)
                    raise GraftError(
                        f"{source}: tensor {hf_name!r} has shape {tuple(tensor.shape)} but the {task} head "
                        f"expects {tuple(expected[name].shape)} (check num_labels / id2label)"
                    )
            head.load_state_dict(head_state, strict=False)
        elif names and to_train:
            log.info("%s: no %s head in this checkpoint; a new one is initialized to train", source, task)
        elif names:
            log.warning(
                "%s: no %s head in this checkpoint; a new one is initialized (train it before use)",
                source,
                task,
            )
        result = TaskModel(body, head)
    if rest:
        log.warning(
            "%s: %d tensors not used by a %s %s model: %s",
            source,
            len(rest),
            family.name,
            task,
            ", ".join(sorted(rest)[:5]),
        )
    result.eval()
    if dtype is None and method == "bf16":
        dtype = torch.bfloat16
    if dtype is not None or device is not None:
        result.to(device=device, dtype=dtype)
    return graft.kernels.optimize(result) if kernels else result


def save_model(model: Model, folder: str | Path, tokenizer: Any = None) -> Path:
    """config.json + model.safetensors (+ tokenizer files): transformers' Auto classes load it."""
    model = exportable(model)  # LoRA merged into a copy; adapters/prompts: a clear error
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    body = model.body if isinstance(model, TaskModel) else model
    cfg = body.config
    family = FAMILIES[cfg.family]
    task = model.task if isinstance(model, TaskModel) else "base"
    # a head without a transformers class (embedding) is saved as the base model plus graft_* keys
    arch = family.architectures.get(task, family.architectures["base"])
    body_state = body.state_dict()
    int4_codes(body, body_state, saving=True)
    wmap = with_scales(weight_map(family, cfg, task), body_state)
    state = wmap.to_hf(body_state, prefix=arch != family.architectures["base"])
    if isinstance(model, TaskModel):
        head_state = model.head.state_dict()
        state.update({hf_name: head_state[name] for hf_name, name in model.head.hf_names().items()})
        extra = model.head.hf_config()
        if task not in family.architectures:
            extra = {**extra, "graft_task": task}
    else:
        extra = {}
    dtype = next(body.parameters()).dtype
    # graft_* keys describe this model's head only, not one the checkpoint was read with
    kept = {k: v for k, v in cfg.hf_config.items() if not k.startswith("graft_")}
    pruned = pruning_to_hf(cfg) if isinstance(cfg, TransformerConfig) else {}
    hf = {**kept, **family.config_to_hf(cfg), **pruned, **extra}
    hf["architectures"] = [arch]
    hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    write_weights(state, folder)
    write_json(folder / "config.json", hf)
    if tokenizer is not None:
        tokenizer.save(folder)
    return folder


def load_adapter_model(base: str | Path, adapter: str | Path) -> nn.Module:
    """A base model folder + an adapter folder -> the adapted model (with the saved head, if any)."""
    adapter = Path(adapter)
    head_file = adapter / HEAD_FILE
    config_file = adapter / "adapter_config.json"
    saved = read_json(head_file) if head_file.exists() else None
    task_type = read_json(config_file).get("task_type") if config_file.exists() else None
    if (saved or {}).get("task", "seq2seq" if task_type == "SEQ_2_SEQ_LM" else None) == "seq2seq":
        # the base's own LM head (tied, with BART's logits bias); the adapter may replace its weight
        model = load_model(base, task="seq2seq")
    else:
        model = load_model(base, task="base")
        if saved is not None:
            if saved["task"] not in HEADS:
                raise GraftError(f"{head_file}: unknown task {saved['task']!r} (known: {', '.join(HEADS)})")
            cls = HEADS[saved["task"]]
            model = TaskModel(model, cls(model, **cls.options_from_hf(saved["config"])))
    load_adapter(model, adapter)
    return model.eval()


def load_trained(base: str | Path, folder: str | Path) -> nn.Module:
    """The base model + the same head + the saved strategy, with the trained parameters loaded."""
    folder = Path(folder)
    for name in (META, WEIGHTS):
        if not (folder / name).exists():
            raise GraftError(f"{folder / name}: not found (save_trained writes {META} and {WEIGHTS})")
    meta = read_json(folder / META)
    model: nn.Module = load_model(base, task="base")
    if "task" in meta:
        if meta["task"] not in HEADS:
            raise GraftError(f"{folder / META}: unknown task {meta['task']!r} (known: {', '.join(HEADS)})")
        cls = HEADS[meta["task"]]
        model = TaskModel(model, cls(model, **cls.options_from_hf(meta.get("head", {}))))
    model = apply_strategy(model, meta["strategy"])
    state = load_file(folder / WEIGHTS)
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise GraftError(
            f"{folder / WEIGHTS}: tensor {result.unexpected_keys[0]!r} does not fit this model and strategy"
        )
    return model.eval()
