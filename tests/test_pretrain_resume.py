"""graft pretrain --resume: a run stopped after a checkpoint continues exactly as if never stopped."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_pretrain import LINES, tiny_folder, write_recipe
from test_pretrain_spans import t5_folder, write_corpus

from graft.pretrain import objectives, run
from graft.train import checkpoint as ckpt
from graft.train.config import load_recipe


class Crash(Exception):
    """Stands for a kill right after a checkpoint was written."""


def record_losses(monkeypatch) -> list[float]:
    losses: list[float] = []
    for cls in (objectives.Objective, objectives.ElectraObjective):

        def recorded(self, batch, loss=cls.loss):
            value, count = loss(self, batch)
            losses.append(value.item())
            return value, count

        monkeypatch.setattr(cls, "loss", recorded)
    return losses


def stop_after(monkeypatch, step: int) -> None:
    save = ckpt.save_checkpoint

    def save_then_crash(folder, at, *args, **kwargs):
        path = save(folder, at, *args, **kwargs)
        if at == step:
            raise Crash(path)
        return path

    monkeypatch.setattr(run.ckpt, "save_checkpoint", save_then_crash)


# short speeches and long ones: packed masked-LM rows hold several documents, and long ones go on
# in the next row
SPEECHES = ["Ay.", LINES[0], "No, my lord.", LINES[1] + " " + LINES[2], "Farewell.", LINES[3], "Away!"]

CASES = {
    # whole words, dropout on: the masks and the dropout draws both resume where they were; documents
    # longer than a row are cut into windows: step 2 ends inside a document
    "mlm": ("mlm", "bert", {"whole_word": True}, 8),
    # packed (the default): rows of up to three short speeches, and windows of long ones (step 2 ends
    # inside one)
    "mlm-packed": ("mlm", "bert", {"whole_word": True, "files": SPEECHES}, 20),
    # a window per row, padded (as before packing)
    "mlm-unpacked": ("mlm", "bert", {"pack": False}, 8),
    # documents longer than a row (max_length 6) are cut across rows: step 2 ends inside a document
    "clm": ("clm", "gpt2", {"pack": True}, 6),
    # unpacked, a document per row, a long one in windows of 6: step 2 ends inside a document too
    "clm-unpacked": ("clm", "gpt2", {"pack": False}, 6),
    # the generator's samples resume too
    "electra": ("electra", "bert", {}, 8),
    # rows of documents end to end (17 tokens before corruption): the spans' generator and a position
    "span-corruption": ("span-corruption", "t5", {}, 16),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_resume_gives_the_losses_and_weights_of_an_uninterrupted_run(
    case, monkeypatch, cli, tmp_path, minilm
):
    objective, family, options, width = CASES[case]
    base = t5_folder(tmp_path) if family == "t5" else tiny_folder(tmp_path, minilm, family)
    recipe = write_recipe(tmp_path, base, objective, max_steps=4, accumulate=2)
    data = yaml.safe_load(recipe.read_text())
    data["pretrain"] |= options
    if family == "t5":  # documents in the tiny T5's words
        write_corpus(tmp_path / "corpus.txt", 16)
        data["pretrain"]["files"] = [str(tmp_path / "corpus.txt")]
    if "files" in options:  # the case's own documents
        (tmp_path / "speeches.txt").write_text("\n".join(options["files"]) + "\n")
        data["pretrain"]["files"] = [str(tmp_path / "speeches.txt")]
    data["data"]["max_length"] = width
    data["checkpoint"] = {"every": 2}
    recipe.write_text(yaml.safe_dump(data))
    losses = record_losses(monkeypatch)

    whole = tmp_path / "whole"
    assert cli("pretrain", recipe, f"train.output={whole}").code == 0
    straight = list(losses)
    assert len(straight) == 8  # 4 steps x 2 micro-batches

    losses.clear()
    stopped = tmp_path / "stopped"
    stop_after(monkeypatch, 2)
    with pytest.raises(Crash):
        run.run_pretrain(load_recipe(recipe, [f"train.output={stopped}"]), str(recipe))
    assert not (stopped / "config.json").exists()  # no model yet, only checkpoints
    saved = ckpt.read_file(stopped / "checkpoints" / "step-00000002" / "trainer.pt")
    monkeypatch.undo()
    losses = record_losses(monkeypatch)
    summary = json.loads(cli("pretrain", recipe, f"train.output={stopped}", "--resume").ok().stdout)

    assert losses == straight[4:]  # steps 3 and 4, to the last bit
    finished = json.loads((whole / "pretrain.json").read_text())
    assert summary == {
        k: round(v, 4) if isinstance(v, float) else v for k, v in finished.items() if k != "recipe"
    }
    a, b = load_file(whole / "model.safetensors"), load_file(stopped / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # every objective's checkpoint stood inside a document cut across rows (mlm: windows of 6 tokens)
    assert saved["position"][1] > 0
    assert [p.name for _, p in ckpt.list_checkpoints(stopped / "checkpoints")] == [
        "step-00000002",
        "step-00000004",
    ]


def test_resume_refusals_are_one_line(cli, tmp_path, minilm):
    base = tiny_folder(tmp_path, minilm, "bert")
    recipe = write_recipe(tmp_path, base, "mlm")
    out = tmp_path / "out"
    assert cli("pretrain", recipe, "--resume").error_line() == (
        f"error: {out}: --resume found no complete checkpoint to continue from"
        " (checkpoint.every=N writes one every N steps); run without --resume to start afresh"
    )
    assert cli("pretrain", recipe, "--resume", "--overwrite").error_line() == (
        "error: --resume continues the run in train.output and --overwrite replaces it: pass one"
    )
    assert cli("pretrain", recipe, "checkpoint.every=2").code == 0
    assert cli("pretrain", recipe).error_line() == (
        f"error: {out}: holds checkpoints of an earlier run; pass --resume to continue it,"
        " --overwrite to start afresh, or set train.output to a new folder"
    )
    assert cli("pretrain", recipe, "checkpoint.every=2", "--resume", "optim.lr=0.5").error_line() == (
        f"error: {out / 'checkpoints' / 'step-00000003'}: --resume continues a run with the recipe it"
        " started with, and these differ: optim.lr 0.001 -> 0.5; change them back, or start a new run"
        " (another train.output, or --overwrite)"
    )
    # a finished run goes on for more steps
    more = json.loads(
        cli("pretrain", recipe, "checkpoint.every=2", "train.max_steps=4", "--resume").ok().stdout
    )
    assert more["steps"] == 4
    assert LINES
