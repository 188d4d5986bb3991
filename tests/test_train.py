"""The training loop: accumulation, schedules, optimizers, losses, sampler, recipes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from test_train_helpers import collate, tiny_data, tiny_model, tiny_recipe

from graft.errors import GraftError
from graft.train import StepSampler, Trainer, load_recipe
from graft.train.checkpoint import list_checkpoints
from graft.train.config import OptimSection, ScheduleSection, TaskSection, dump_recipe
from graft.train.loggers import read_metrics
from graft.train.losses import balanced_weights, class_loss, make_loss
from graft.train.optim import build_optimizer
from graft.train.schedules import lr_factor


def train(tmp_path, name, steps=3, **sections):
    model = tiny_model()
    sections.setdefault("train", {})
    sections["train"] = {"max_steps": steps, **sections["train"]}
    recipe = tiny_recipe(tmp_path / name, **sections)
    result = Trainer(model, recipe, tiny_data(), collate, quiet=True).fit()
    return model, result


@pytest.mark.parametrize("batch,accumulate", [(4, 2), (2, 4), (1, 8)])
def test_accumulation_equals_one_big_batch(tmp_path, batch, accumulate):
    # SGD: Adam would blow rounding noise on zero-gradient parameters (key biases) up to lr-sized steps.
    optim = {"name": "sgd", "lr": 0.1}
    big, _ = train(tmp_path, "big", train={"batch_size": 8, "accumulate": 1}, optim=optim)
    small, _ = train(tmp_path, "small", train={"batch_size": batch, "accumulate": accumulate}, optim=optim)
    for (name, a), b in zip(big.state_dict().items(), small.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    loss_big = [line["loss"] for line in read_metrics(tmp_path / "big")]
    loss_small = [line["loss"] for line in read_metrics(tmp_path / "small")]
    assert loss_big == pytest.approx(loss_small, abs=1e-6)


# ---- recipes ---------------------------------------------------------------------------------


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_recipe_loads_with_overrides_and_coerces_types(tmp_path):
    recipe_file = write(tmp_path / "r.yaml", "model: {path: m}\noptim: {lr: 3e-5}\ntrain: {epochs: 2}\n")
    recipe = load_recipe(recipe_file, ["optim.lr=1e-4", "train.batch_size=8", "train.group_by_length=true"])
    assert recipe.optim.lr == 1e-4 and isinstance(recipe.optim.lr, float)
    assert recipe.train.epochs == 2.0 and recipe.train.batch_size == 8 and recipe.train.group_by_length
    assert (
        load_recipe(recipe_file).optim.lr == 3e-5
    )  # YAML reads 3e-5 as text; the recipe knows it is a float
    again = load_recipe(write(tmp_path / "again.yaml", dump_recipe(recipe)))
    assert again == recipe


@pytest.mark.parametrize(
    "text,overrides,message",
    [
        ("optim: {lrr: 1}\n", [], "r.yaml: unknown key 'optim.lrr'; did you mean 'optim.lr'?"),
        ("trian: {epochs: 1}\n", [], "r.yaml: unknown key 'trian'; did you mean 'train'?"),
        ("", ["train.epoch=2"], "unknown key 'train.epoch'; did you mean 'train.epochs'?"),
        (
            "optim: {name: adamx}\n",
            [],
            "optim.name: unknown value 'adamx' (one of adamw, adafactor, sgd); did you mean 'adamw'?",
        ),
        ("train: {batch_size: many}\n", [], "train.batch_size: expected int, got 'many'"),
        ("train: [1, 2]\n", [], "train: expected a mapping"),
        ("data: {val_fraction: 2}\n", [], "data.val_fraction: must be in [0, 1)"),
        ("model: {path: [\n", [], "r.yaml, line 2: not valid YAML"),
    ],
)
def test_recipe_errors_are_one_line_and_suggest(tmp_path, text, overrides, message):
    with pytest.raises(GraftError) as error:
        load_recipe(write(tmp_path / "r.yaml", text), overrides)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_missing_recipe_file_is_one_line(tmp_path):
    with pytest.raises(GraftError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


# ---- optimizers and schedules ----------------------------------------------------------------


def test_adamw_does_not_decay_biases_and_norms():
    model = tiny_model()
    optimizer = build_optimizer(model, OptimSection(name="adamw", weight_decay=0.1))
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in decayed}
    assert names and all(n.endswith("weight") and "norm" not in n for n in names)
    assert "body.layers.0.attn.q.weight" in names and "body.layers.0.attn_norm.weight" not in names
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


@pytest.mark.parametrize("name", ["adamw", "adafactor", "sgd"])
def test_every_optimizer_trains(tmp_path, name):
    _, result = train(tmp_path, name, steps=2, optim={"name": name, "lr": 1e-3})
    assert result["steps"] == 2


def test_frozen_parameters_get_no_optimizer_state():
    model = tiny_model()
    model.body.embed.requires_grad_(False)
    optimizer = build_optimizer(model, OptimSection())
    trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in trained for p in model.body.embed.parameters())


@pytest.mark.parametrize(
    "name,expected",
    [
        ("linear", [0.0, 0.5, 1.0, 0.75, 0.5, 0.25]),
        ("constant", [0.0, 0.5, 1.0, 1.0, 1.0, 1.0]),
        (
            "cosine",
            [0.0, 0.5, 1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2],
        ),
        ("step", [0.0, 0.5, 1.0, 1.0, 0.1, 0.1]),
    ],
)
def test_warmup_then_decay(name, expected):
    cfg = ScheduleSection(name=name, warmup_steps=2, step_size=2, gamma=0.1)
    assert [lr_factor(cfg, step, 6) for step in range(6)] == pytest.approx(expected)


def test_warmup_ratio_and_floor():
    cfg = ScheduleSection(name="linear", warmup_ratio=0.25, min_lr_ratio=0.1)
    assert lr_factor(cfg, 1, 8) == 0.5 and lr_factor(cfg, 8, 8) == pytest.approx(0.1)


# ---- losses ----------------------------------------------------------------------------------


def test_label_smoothing_matches_torch():
    logits, labels = torch.randn(6, 4), torch.tensor([0, 3, 1, -100, 2, 2])
    total, count = class_loss(logits, labels, smoothing=0.2)
    reference = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.2, ignore_index=-100)
    torch.testing.assert_close(total / count, reference)


def test_class_weights_match_torch_and_balanced_weights():
    logits, labels = torch.randn(6, 3), torch.tensor([0, 0, 0, 0, 1, 2])
    weight = balanced_weights(labels.tolist(), 3)
    torch.testing.assert_close(weight, torch.tensor([0.5, 2.0, 2.0]))
    total, count = class_loss(logits, labels, weight=weight)
    torch.testing.assert_close(
        total / count, torch.nn.functional.cross_entropy(logits, labels, weight=weight)
    )


def test_focal_loss_down_weights_easy_examples():
    logits = torch.tensor([[4.0, 0.0], [0.0, 0.1]])  # the first is easy and right
    labels = torch.tensor([0, 0])
    plain = [class_loss(logits[i : i + 1], labels[i : i + 1])[0] for i in range(2)]
    focal = [class_loss(logits[i : i + 1], labels[i : i + 1], gamma=2.0)[0] for i in range(2)]
    assert focal[0] / plain[0] < 0.001 and focal[1] / plain[1] > 0.2
    p = torch.softmax(logits, -1)[:, 0]
    torch.testing.assert_close(torch.stack(focal), -((1 - p) ** 2) * p.log())


def test_trainer_uses_smoothed_weighted_loss_and_counts(tmp_path):
    task = TaskSection(label_smoothing=0.1, class_weights=[1.0, 2.0, 3.0])
    loss = make_loss(task, "token-test", 3)
    batch = collate(tiny_data(4))
    assert loss[1](batch) == float(sum((batch["labels"][batch["labels"] != -100] + 1).tolist()))
    _, result = train(
        tmp_path, "smooth", steps=2, task={"label_smoothing": 0.1, "class_weights": [1.0, 2.0, 3.0]}
    )
    assert result["steps"] == 2


# ---- sampler ---------------------------------------------------------------------------------


def test_sampler_is_a_pure_function_of_seed_and_epoch():
    a, b = StepSampler(50, 4, accumulate=2, seed=3), StepSampler(50, 4, accumulate=2, seed=3)
    assert [s.tolist() for s in a.steps(1)] == [s.tolist() for s in b.steps(1)]
    assert [s.tolist() for s in a.steps(0)] != [s.tolist() for s in a.steps(1)]
    everything = np.concatenate(a.steps(0))
    assert sorted(everything.tolist()) == list(range(50)) and len(a) == 7
    resumed = [m.tolist() for _, micro in a.iterate(0, start=4) for m in micro]
    assert resumed == [m.tolist() for s in a.steps(0)[4:] for m in a.micro_batches(s)]


def test_sampler_shards_like_distributed_sampler():
    one = StepSampler(48, 4, accumulate=1, seed=0, world_size=1)
    ranks = [StepSampler(48, 2, accumulate=1, seed=0, world_size=2, rank=r) for r in range(2)]
    for step, (a, b) in zip(one.steps(0), zip(*(r.steps(0) for r in ranks), strict=True), strict=True):
        parts = [ranks[r].micro_batches(s)[0] for r, s in enumerate((a, b))]
        assert sorted(np.concatenate(parts).tolist()) == sorted(step.tolist())
        assert not set(parts[0].tolist()) & set(parts[1].tolist())


def test_length_grouping_reduces_padding_and_curriculum_goes_short_to_long():
    lengths = np.random.default_rng(0).integers(1, 200, 400)
    plain = StepSampler(400, 8, lengths=lengths)
    grouped = StepSampler(400, 8, lengths=lengths, group_by_length=True)

    def padding(sampler):
        return sum(
            int(lengths[m].max() * len(m) - lengths[m].sum())
            for s in sampler.steps(0)
            for m in sampler.micro_batches(s)
        )

    assert padding(grouped) < padding(plain) / 5
    assert sorted(np.concatenate(grouped.steps(0)).tolist()) == list(range(400))
    curriculum = StepSampler(400, 8, lengths=lengths, curriculum_epochs=1)
    first = np.concatenate(curriculum.steps(0))
    assert (np.diff(lengths[first]) >= 0).all()
    assert not (np.diff(lengths[np.concatenate(curriculum.steps(1))]) >= 0).all()


# ---- the loop --------------------------------------------------------------------------------


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path):
    def poison(trainer, out):
        if trainer.state.global_step == 2:
            with torch.no_grad():
                trainer.module.head.proj.weight.fill_(float("nan"))

    recipe = tiny_recipe(tmp_path, train={"max_steps": 4}, checkpoint={"every": 1})
    trainer = Trainer(tiny_model(), recipe, tiny_data(), collate, callbacks=[poison], quiet=True)
    with pytest.raises(
        GraftError, match=r"step 3: the loss is nan; training stopped \(the last good checkpoint"
    ):
        trainer.fit()
    steps = [s for s, _ in list_checkpoints(tmp_path / "checkpoints")]
    assert steps == [1, 2]
    state = torch.load(tmp_path / "checkpoints" / "step-00000002" / "model.pt")
    assert all(torch.isfinite(t).all() for t in state.values())


def test_early_stopping_and_best_model_are_independent(tmp_path):
    # lr 0 never improves: early stopping ends the run after `patience` evaluations past the first.
    recipe = tiny_recipe(
        tmp_path, train={"epochs": 10}, optim={"name": "sgd", "lr": 1e-9}, eval={"every": 1, "metric": "accuracy"},
        early_stopping={"patience": 2, "metric": "loss", "threshold": 0.01}, checkpoint={"every": 0, "keep": 1},
    )  # fmt: skip
    data = tiny_data(16)
    result = Trainer(tiny_model(), recipe, data, collate, data[:8], quiet=True).fit()
    assert result["stopped_early"] and result["steps"] == 3
    assert result["best_step"] == 1  # accuracy never beat its first value
    kept = [s for s, _ in list_checkpoints(tmp_path / "checkpoints")]
    assert kept == [1, 3]  # the best one survives keep=1
    evals = read_metrics(tmp_path, "eval")
    assert [e["step"] for e in evals] == [1, 2, 3] and "eval/accuracy" in evals[0]


def test_run_folder_has_config_facts_metrics_and_plots(tmp_path):
    recipe = tiny_recipe(tmp_path, train={"max_steps": 3, "plots": True}, eval={"every": 2})
    data = tiny_data(32)
    Trainer(tiny_model(), recipe, data, collate, data[:8], quiet=True).fit()
    facts = json.loads((tmp_path / "run.json").read_text())
    assert facts["seed"] == 0 and "torch" in facts["versions"] and "git_commit" in facts
    assert load_recipe(tmp_path / "config.yaml") == recipe
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    for name in ("loss.png", "lr.png", "eval.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_bf16_autocast_on_cpu_and_gradient_checkpointing_train(tmp_path):
    _, result = train(tmp_path, "bf16", steps=2, train={"precision": "bf16", "gradient_checkpointing": True})
    assert result["steps"] == 2
    with pytest.raises(GraftError, match="fp16 needs a CUDA device"):
        train(tmp_path, "fp16", steps=1, train={"precision": "fp16"})


def test_a_finished_run_is_not_overwritten_without_resume(tmp_path):
    train(tmp_path, "run", steps=1)
    with pytest.raises(GraftError, match="pass --resume"):
        train(tmp_path, "run", steps=1)


def test_tune_prunes_trials_that_fall_behind(tmp_path, capsys):
    from types import SimpleNamespace

    from graft.train.tune import run_search

    recipe = tiny_recipe(
        tmp_path,
        eval={"metric": "accuracy"},
        tune={"trials": 8, "space": {"optim.lr": {"type": "float", "low": 0.0, "high": 1.0}}},
    )

    def fake_run(trial_recipe, callbacks):
        quality = trial_recipe.optim.lr  # a higher "lr" learns better, at every step
        state = SimpleNamespace(global_step=0, last_eval_step=0, last_metrics={})
        for step in range(1, 6):
            state.global_step = state.last_eval_step = step
            state.last_metrics = {"accuracy": quality * step / 5}
            for callback in callbacks:
                callback(SimpleNamespace(state=state), {})
        return {"best_metric": quality, "eval/accuracy": quality}

    summary = run_search(recipe, run=fake_run)
    states = [row["state"] for row in summary["trials"]]
    assert "pruned" in states and states.count("complete") >= 2
    best = max(row["accuracy"] for row in summary["trials"] if row["state"] == "complete")
    assert summary["best_value"] == best
    assert "hyperparameter search" in capsys.readouterr().out


def test_a_micro_batch_without_labelled_items_is_harmless(tmp_path):
    data = tiny_data(16)
    for example in data[:4]:  # the first micro-batch of the first step has nothing to learn
        example["labels"] = [-100] * len(example["labels"])
    recipe = tiny_recipe(tmp_path, train={"max_steps": 2, "batch_size": 4, "accumulate": 2})
    trainer = Trainer(tiny_model(), recipe, data, collate, quiet=True)
    trainer.sampler.shuffle = False
    result = trainer.fit()
    assert result["steps"] == 2 and all(math.isfinite(r["loss"]) for r in read_metrics(tmp_path))


def test_each_step_is_saved_once_after_its_evaluation(tmp_path, monkeypatch):
    """The last step used to be saved twice (again after the final evaluation, its folder deleted
    first): a kill in between left step-N/ without model.pt. Now it is evaluated, then saved, once."""
    from graft.train import checkpoint

    saved, real = [], checkpoint.save_checkpoint
    monkeypatch.setattr(checkpoint, "save_checkpoint", lambda folder, step, *a, **k: saved.append(step) or real(folder, step, *a, **k))  # fmt: skip
    recipe = tiny_recipe(
        tmp_path, train={"max_steps": 4}, eval={"every": 3}, checkpoint={"every": 2, "keep": 5}
    )
    data = tiny_data(32)
    Trainer(tiny_model(), recipe, data, collate, data[:8], quiet=True).fit()
    assert saved == [2, 3, 4]  # 3: the best evaluation
    state = torch.load(tmp_path / "checkpoints" / "step-00000004" / "trainer.pt")
    assert state["last_eval_step"] == 4 and state["best_step"] == 4


def test_nan_stop_names_the_checkpoint_saved_before_the_loss_exploded(tmp_path):
    def diverge(trainer, out):
        with torch.no_grad():
            if trainer.state.global_step == 2:  # after step 2's checkpoint: step 3's loss explodes
                trainer.module.head.proj.weight.mul_(1e4)
            if trainer.state.global_step == 3:
                trainer.module.head.proj.weight.fill_(float("nan"))

    recipe = tiny_recipe(tmp_path, train={"max_steps": 6}, checkpoint={"every": 1, "keep": 5})
    trainer = Trainer(tiny_model(), recipe, tiny_data(), collate, callbacks=[diverge], quiet=True)
    with pytest.raises(GraftError) as error:
        trainer.fit()
    first = trainer.state.first_loss
    assert str(error.value) == (
        f"step 4: the loss is nan; training stopped (the last good checkpoint is "
        f"{tmp_path / 'checkpoints' / 'step-00000002'}; the newer step-00000003 were saved while the loss "
        f"exploded (above 2x the first loss, {first:.4g}): remove them before --resume). "
        "Try a lower optim.lr, train.clip_norm, or train.precision=fp32"
    )


def test_an_earlier_runs_model_is_replaced_only_with_overwrite(tmp_path):
    from graft.loading import load_model

    def fit(seed, **options):
        recipe = tiny_recipe(
            tmp_path, train={"max_steps": 2, "seed": seed}, checkpoint={"keep": 0, "save_model": True}
        )
        Trainer(tiny_model(seed), recipe, tiny_data(), collate, quiet=True).fit(**options)
        return load_model(tmp_path / "model", task="token-classification", num_labels=3).state_dict()

    first = fit(0)
    with pytest.raises(GraftError) as error:
        fit(1)
    assert str(error.value) == (
        f"{tmp_path / 'model'}: holds the model of an earlier run; pass --overwrite to replace it "
        "(--resume to continue that run), or set train.output to a new folder"
    )
    assert all(torch.equal(a, b) for a, b in zip(first.values(), load_model(tmp_path / "model", task="token-classification", num_labels=3).state_dict().values(), strict=True))  # fmt: skip
    second = fit(1, overwrite=True)
    assert not all(torch.equal(a, b) for a, b in zip(first.values(), second.values(), strict=True))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # nothing left aside


def test_overwrite_starts_afresh_without_the_earlier_checkpoints(tmp_path):
    train(tmp_path, "run", steps=3, checkpoint={"every": 1})
    with pytest.raises(GraftError, match="pass --resume to continue it, --overwrite to start afresh"):
        train(tmp_path, "run", steps=1)
    model = tiny_model()
    recipe = tiny_recipe(tmp_path / "run", train={"max_steps": 1})
    Trainer(model, recipe, tiny_data(), collate, quiet=True).fit(overwrite=True)
    assert [s for s, _ in list_checkpoints(tmp_path / "run" / "checkpoints")] == [1]


def test_a_run_folder_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "taken").write_text("mine")
    with pytest.raises(GraftError, match=r"train.output: .*taken is a file; the run folder must be a folder"):
        train(tmp_path, "taken", steps=1)
    assert (tmp_path / "taken").read_text() == "mine"


def test_a_new_head_warns_unless_it_is_about_to_train(minilm, caplog):
    """Loading a base model for prediction warns that the head is random; training says it plainly."""
    import logging

    from graft.loading import load_model

    with caplog.at_level(logging.INFO, logger="graft"):
        load_model(minilm, task="classification", num_labels=2)
        load_model(minilm, task="classification", num_labels=2, to_train=True)
    notes = [
        (r.levelno, r.getMessage().split(": ", 1)[1]) for r in caplog.records if "head" in r.getMessage()
    ]
    assert notes == [
        (
            logging.WARNING,
            "no classification head in this checkpoint; a new one is initialized (train it before use)",
        ),
        (logging.INFO, "no classification head in this checkpoint; a new one is initialized to train"),
    ]
