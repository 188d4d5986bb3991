"""Sentence embeddings with all-MiniLM-L6-v2 in fp32: graft vs transformers vs sentence-transformers.

Two workloads, each in the order given: (a) BBC News articles truncated at 256 tokens, (b) the
book's 200 questions and 200 answers. Prints real tokens/s of each, the ratios, and the largest
difference between graft's and transformers' embeddings; ends with one JSON line. graft runs twice:
on its CPU kernels (the default) and as graft.nn's plain reference (``kernels=False``), timed in
the same rounds, so the kernels' gain on this processor is measured too.

    python bench/embed.py [--articles N] [--repeats R]
"""

from __future__ import annotations

import argparse

import torch

from bench.common import bbc_articles, book_questions_and_answers, emit, fail, minilm_folder, timed

MAX_LENGTH = 256
BATCH = 32


def run_transformers(model, tokenizer, texts: list[str]) -> torch.Tensor:
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), BATCH):
            batch = tokenizer(
                texts[i : i + BATCH],
                padding=True,
                truncation=True,
                max_length=MAX_LENGTH,
                return_tensors="pt",
            )
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out.append((hidden * mask).sum(1) / mask.sum(1))
    return torch.cat(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--articles", type=int, default=600, help="BBC articles to embed (0 = all 2,225)")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs per system")
    args = parser.parse_args()
    try:
        import transformers
        from sentence_transformers import SentenceTransformer

        from graft.loading import load_model
        from graft.tasks.embedding import embed
        from graft.tokenizer import Tokenizer
    except ImportError as e:
        fail(f"missing package: {e.name} (pip install -e '.[test]')")

    folder = minilm_folder()
    questions, answers = book_questions_and_answers()
    workloads = {"bbc_256": bbc_articles(args.articles or None), "short": questions + answers}

    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    hf_model = transformers.AutoModel.from_pretrained(folder, attn_implementation="sdpa").eval()
    st_model = SentenceTransformer(str(folder), device="cpu")
    st_model.max_seq_length = MAX_LENGTH
    graft_model = load_model(folder, task="base")
    reference_model = load_model(folder, task="base", kernels=False)
    graft_tok = Tokenizer.from_folder(folder)

    figures: dict = {}
    for name, texts in workloads.items():
        tokens = sum(hf_tok(texts, truncation=True, max_length=MAX_LENGTH, return_length=True)["length"])
        systems = {
            "transformers": lambda t=texts: run_transformers(hf_model, hf_tok, t),
            "sentence_transformers": lambda t=texts: st_model.encode(
                t, batch_size=BATCH, convert_to_tensor=True
            ),
            # graft batches by its own default: length-sorted, up to 1024 padded tokens a batch
            "graft": lambda t=texts: embed(graft_model, graft_tok, t, max_length=MAX_LENGTH),
            "graft_reference": lambda t=texts: embed(reference_model, graft_tok, t, max_length=MAX_LENGTH),
        }
        for fn in systems.values():  # warm up (graft's kernels time their routes at first use)
            fn(texts[:BATCH])
        # the systems take turns, once each per round, so a change in the machine's load hits all
        results, best = {}, dict.fromkeys(systems, float("inf"))
        for _ in range(args.repeats):
            for system, fn in systems.items():
                results[system], seconds = timed(fn)
                best[system] = min(best[system], seconds)
        for system, seconds in best.items():
            figures[f"{name}_{system}_tokens_per_s"] = round(tokens / seconds, 1)
        fastest_other = max(
            figures[f"{name}_transformers_tokens_per_s"],
            figures[f"{name}_sentence_transformers_tokens_per_s"],
        )
        figures[f"{name}_tokens"] = tokens
        figures[f"{name}_graft_vs_fastest_other"] = round(
            figures[f"{name}_graft_tokens_per_s"] / fastest_other, 3
        )
        # the plain reference against the kernels: how much slower (or faster) it is here
        figures[f"{name}_graft_reference_vs_graft"] = round(
            figures[f"{name}_graft_reference_tokens_per_s"] / figures[f"{name}_graft_tokens_per_s"], 3
        )
        figures[f"{name}_graft_reference_vs_fastest_other"] = round(
            figures[f"{name}_graft_reference_tokens_per_s"] / fastest_other, 3
        )
        for system, field in (("graft", "max_abs_diff"), ("graft_reference", "graft_reference_max_abs_diff")):
            figures[f"{name}_{field}_vs_transformers"] = float(
                (results[system] - results["transformers"]).abs().max()
            )
        print(
            f"{name:8s} {len(texts):5d} texts {tokens:8,d} tokens | "
            + " | ".join(f"{s} {figures[f'{name}_{s}_tokens_per_s']:8,.0f} tok/s" for s in systems)
            + f" | graft/fastest other {figures[f'{name}_graft_vs_fastest_other']:.2f}x"
            + f" | reference/graft {figures[f'{name}_graft_reference_vs_graft']:.2f}x"
            + f" | max |graft - transformers| {figures[f'{name}_max_abs_diff_vs_transformers']:.1e}"
            + f" (reference {figures[f'{name}_graft_reference_max_abs_diff_vs_transformers']:.1e})"
        )
    emit(figures)


if __name__ == "__main__":
    main()
