"""Distillation: the soft-target loss is the hand computation, a student learns from its teacher
for each task (with hidden-state and attention transfer), students are built as asked, and every
mismatch between student and teacher is one line; ``graft distill`` runs a recipe end to end."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import transformers
from conftest import padded_batch, tiny_hf_config

import graft.kernels
from graft.compress.distill import (
    Distiller,
    attention_loss,
    fresh_student,
    keep_layers,
    last_values,
    soft_loss,
    uniform_map,
    value_relation,
)
from graft.errors import GraftError
from graft.loading import load_model, save_model
from graft.tasks import TaskModel

LABELS = ["a", "b", "c"]


def teacher_model(family: str, task: str, folder, layers: int = 4) -> TaskModel:
    torch.manual_seed(0)
    cfg = tiny_hf_config(family)
    cfg.pad_token_id = cfg.pad_token_id or 0
    for key in ("num_hidden_layers", "n_layer"):
        if hasattr(cfg, key):
            setattr(cfg, key, layers)
    transformers.AutoModel.from_config(cfg).save_pretrained(folder)
    options = {"id2label": LABELS} if task != "causal-lm" else {}
    return load_model(folder, task=task, **options)


def batch(task: str) -> dict:
    ids, mask = padded_batch()
    if task == "classification":
        labels = torch.tensor([0, 2, 1])
    elif task == "token-classification":
        labels = (ids % 3).masked_fill(mask == 0, -100)
    else:
        labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_soft_target_loss_equals_the_hand_computation():
    student = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    teacher = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    T = 2.0
    expected = 0.0
    for s, t in zip(student.tolist(), teacher.tolist(), strict=True):
        zs = sum(math.exp(x / T) for x in s)
        zt = sum(math.exp(x / T) for x in t)
        p = [math.exp(x / T) / zt for x in t]
        q = [math.exp(x / T) / zs for x in s]
        expected += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    expected = expected / 2 * T**2
    assert abs(float(soft_loss(student, teacher, T)) - expected) < 1e-6
    assert float(soft_loss(teacher, teacher, T)) == pytest.approx(0.0, abs=1e-7)
    keep = torch.tensor([True, False])  # per-token: only the items kept count
    assert float(soft_loss(student, teacher, T, keep)) == pytest.approx(
        float(soft_loss(student[:1], teacher[:1], T))
    )


def test_value_relation_loss_equals_the_hand_computation():
    # one example, one head, three tokens of which the last is padding, head_dim 2
    vs = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]]])  # (B, nh, T, hd)
    vt = torch.tensor([[[[1.0, 1.0], [2.0, 0.0], [-3.0, 7.0]]]])
    mask = torch.tensor([[True, True, False]])

    def relation(v: list[list[float]]) -> list[list[float]]:  # MiniLM eq. 4 over the two real tokens
        rows = []
        for i in range(2):
            e = [
                math.exp(sum(a * b for a, b in zip(v[i], v[j], strict=True)) / math.sqrt(2)) for j in range(2)
            ]
            rows.append([x / sum(e) for x in e])
        return rows

    s, t = relation(vs[0, 0].tolist()), relation(vt[0, 0].tolist())
    # eq. 5: KL(teacher || student) per query, averaged over the real queries (and the one head)
    expected = sum(sum(t[i][j] * math.log(t[i][j] / s[i][j]) for j in range(2)) for i in range(2)) / 2
    rs, rt = value_relation(vs, mask), value_relation(vt, mask)
    assert torch.equal(rs[0, 0, :, 2], torch.zeros(3))  # the padding key gets nothing
    assert abs(float(attention_loss(rs, rt, mask)) - expected) < 1e-6
    assert float(attention_loss(rt, rt, mask)) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("family", ["bert", "gpt2"])  # post-LN and pre-LN with a final norm
def test_last_values_are_the_values_the_last_attention_computes(family, tmp_path):
    model = teacher_model(family, "classification" if family == "bert" else "causal-lm", tmp_path)
    graft.kernels.reference(model)  # the reference calls attn.v itself (the kernels fuse Q/K/V)
    seen = []
    attn = model.body.layers[-1].attn
    hook = attn.v.register_forward_hook(lambda module, args, out: seen.append(out))
    b = batch(model.task)
    with torch.no_grad():
        out = model.body(
            input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True
        )
        values = last_values(model, out.hidden_states)  # (B, nkv, T, hd)
    hook.remove()
    B, T = b["input_ids"].shape
    assert values.shape == (B, attn.num_kv_heads, T, attn.head_dim)
    assert len(seen) == 2  # the forward's own call, then last_values' one
    assert torch.equal(values.transpose(1, 2).reshape(B, T, -1), seen[0])


@pytest.mark.parametrize(
    ("family", "task", "how"),
    [
        ("bert", "classification", "layers"),
        ("bert", "token-classification", "fresh"),
        ("gpt2", "causal-lm", "layers"),
    ],
)
def test_the_student_loss_decreases_with_every_loss_on(family, task, how, tmp_path):
    teacher = teacher_model(family, task, tmp_path)
    if how == "layers":
        student, layer_map = keep_layers(teacher, [1, 3]), [1, 3]
    else:  # narrower and shallower: the hidden states go through a learned projection
        student, layer_map = (
            fresh_student(teacher, {"num_layers": 2, "hidden_size": 16, "num_heads": 2}),
            None,
        )
    distiller = Distiller(
        student,
        teacher,
        temperature=2.0,
        soft=1.0,
        hard=0.5,
        hidden=1.0,
        attention=1.0,
        layer_map=layer_map,
        value=1.0,
    )
    assert (distiller.projection is None) == (how == "layers")
    before = [p.clone() for p in teacher.parameters()]
    b = batch(task)
    optimizer = torch.optim.AdamW([p for p in distiller.parameters() if p.requires_grad], lr=3e-3)

    def loss_now() -> float:  # without dropout: the same batch, the same numbers
        distiller.eval()
        with torch.no_grad():
            return float(distiller(**b).loss)

    first = loss_now()
    for _ in range(20):
        distiller.train()
        loss = distiller(**b).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss_now() < 0.8 * first
    assert all(
        torch.equal(p, q) for p, q in zip(before, teacher.parameters(), strict=True)
    )  # the teacher is frozen
    assert not any(n.startswith("teacher") for n in distiller.state_dict())


def test_a_student_of_kept_layers_equals_the_teacher_when_it_keeps_them_all(tmp_path):
    teacher = teacher_model("bert", "classification", tmp_path)
    student = keep_layers(teacher, [0, 1, 2, 3])
    b = batch("classification")
    with torch.no_grad():
        assert torch.equal(student(**b).logits, teacher(**b).logits)
    small = keep_layers(teacher, [1, 3])
    assert small.body.config.num_layers == 2 and len(small.body.layers) == 2
    save_model(small, tmp_path / "student")
    again = load_model(tmp_path / "student")
    with torch.no_grad():
        assert (again(**b).logits - small(**b).logits).abs().max() <= 1e-5
    assert uniform_map(2, 4) == [1, 3] and uniform_map(3, 6) == [1, 3, 5]


def test_student_and_teacher_mismatches_are_one_line(tmp_path):
    teacher = teacher_model("bert", "classification", tmp_path / "t")
    with pytest.raises(GraftError, match=r"^distill.layers: 7 is not a layer of the teacher \(0 to 3\)$"):
        keep_layers(teacher, [1, 7])
    with pytest.raises(
        GraftError, match=r"^distill: the student \(hidden_size 64\) is wider than the teacher \(32\)$"
    ):
        fresh_student(teacher, {"hidden_size": 64})
    with pytest.raises(
        GraftError, match=r"^distill.student: unknown key 'num_layer'; did you mean 'num_layers'\?$"
    ):
        fresh_student(teacher, {"num_layer": 1})
    other = copy.deepcopy(teacher)
    other.body.config = copy.copy(other.body.config)
    other.body.config.vocab_size = 120
    with pytest.raises(
        GraftError,
        match=r"^distill: the student's vocabulary \(120 tokens\) differs from the teacher's \(99\); a student reads",
    ):
        Distiller(other, teacher)
    lm = teacher_model("gpt2", "causal-lm", tmp_path / "lm")
    with pytest.raises(
        GraftError, match="^distill: the student is a causal-lm model and the teacher a classification one$"
    ):
        Distiller(lm, teacher)


# ---- the commands, end to end, on a tiny BERT with MiniLM's tokenizer ----


@pytest.fixture(scope="module")
def assets(tmp_path_factory, minilm):
    """A 4-layer tiny BERT classifier (the teacher) with MiniLM's tokenizer, labelled and unlabelled texts."""
    import csv
    import random
    import shutil

    from graft.tokenizer import Tokenizer

    folder = tmp_path_factory.mktemp("distill")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=64,
    )  # fmt: skip
    transformers.BertModel(config).save_pretrained(folder / "base")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm / name, folder / "base" / name)
    teacher = load_model(folder / "base", task="classification", id2label=["sport", "tech"])
    save_model(teacher, folder / "teacher", Tokenizer.from_folder(folder / "base"))
    rng = random.Random(0)
    words = {"sport": "goal match team win league", "tech": "chip software phone data cloud"}

    def text(label: str) -> str:
        return " ".join(rng.choice(words[label].split()) for _ in range(rng.randint(3, 12)))

    with open(folder / "train.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for _ in range(32):
            label = rng.choice(sorted(words))
            writer.writerow([text(label), label])
    with open(folder / "transfer.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text"])
        for _ in range(16):
            writer.writerow([text(rng.choice(sorted(words)))])
    recipe = folder / "distill.yaml"
    recipe.write_text(
        f"data:\n  train: {folder / 'train.csv'}\n  val_fraction: 0.25\n"
        f"train:\n  batch_size: 8\n  max_steps: 4\n  plots: false\n"
        f"distill:\n  teacher: {folder / 'teacher'}\n  every: 2\n  hidden: 1.0\n  attention: 1.0\n  value: 1.0\n"
    )
    return {"folder": folder, "teacher": folder / "teacher", "data": folder / "train.csv", "recipe": recipe}


def test_graft_distill_writes_a_student_that_loads(assets, tmp_path, cli):
    out = tmp_path / "run"
    result = cli(
        "distill",
        assets["recipe"],
        f"train.output={out}",
        f"distill.transfer={assets['folder'] / 'transfer.csv'}",
    )
    result.ok()
    student = load_model(out / "model")
    assert student.task == "classification" and student.body.config.num_layers == 2
    assert '"layers": 2' in result.stdout and "transfer examples labelled by the teacher" in result.stderr


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("distill.layers=[1,7]", "error: distill.layers: 7 is not a layer of the teacher (0 to 3)"),
        ("distill.every=5", "error: distill.every: 5 is more than the teacher's 4 layers"),
        (
            "distill.student={hidden_size: 64}",
            "error: distill: the student (hidden_size 64) is wider than the teacher (32)",
        ),
        ("distill.temprature=3", "distill.temperature"),
        (
            "task.name=token-classification",
            "error: task.name: the teacher is a classification model; set task.name=classification",
        ),
    ],
)
def test_distill_errors_are_one_line(assets, tmp_path, cli, override, message):
    args = ["distill", assets["recipe"], f"train.output={tmp_path / 'run'}"]
    if override.startswith(("distill.layers", "distill.student")):
        args.append("distill.every=0")
    line = cli(*args, override).error_line()
    assert line.startswith(message) or message in line, line


def test_distill_from_a_student_with_another_vocabulary_is_one_line(assets, tmp_path, cli):
    cfg = tiny_hf_config("bert")  # 99 tokens
    transformers.AutoModel.from_config(cfg).save_pretrained(tmp_path / "small")
    line = cli(
        "distill",
        assets["recipe"],
        "distill.every=0",
        f"model.path={tmp_path / 'small'}",
        f"train.output={tmp_path / 'run'}",
    ).error_line()
    assert line.startswith(
        "error: distill: the student's vocabulary (99 tokens, model.path) differs from the teacher's (30522)"
    )


def test_distill_into_a_student_folder_wider_than_the_teacher_is_one_line(assets, tmp_path, cli):
    config = transformers.BertConfig(
        vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=64,
    )  # fmt: skip
    transformers.BertModel(config).save_pretrained(tmp_path / "wide")
    line = cli(
        "distill",
        assets["recipe"],
        "distill.every=0",
        f"model.path={tmp_path / 'wide'}",
        f"train.output={tmp_path / 'run'}",
    ).error_line()
    assert line == "error: distill: the student (hidden_size 64, model.path) is wider than the teacher (32)"
    assert not (tmp_path / "run" / "model").exists()


def test_graft_prune_and_graft_heads(assets, tmp_path, cli):
    out = tmp_path / "pruned"
    result = cli("prune", assets["teacher"], out, "--data", assets["data"], "--heads", "0.25", "--ffn", "0.25",
                 "--recover-steps", "2", "--distill")  # fmt: skip
    result.ok()
    pruned = load_model(out)
    assert sum(pruned.body.config.heads_per_layer) == 12
    assert sum(pruned.body.config.intermediate_sizes) == 4 * 37 - int(0.25 * 4 * 37)
    assert (out / "prune_report.json").exists() and (out / "tokenizer.json").exists()
    line = cli(
        "prune", assets["teacher"], tmp_path / "p2", "--data", assets["data"], "--heads", "0.9"
    ).error_line()
    assert (
        line
        == "error: prune: --heads 0.9 asks for 14 of 16 heads, but each of the 4 layers keeps at least one (12 at most)"
    )
    sparse = cli(
        "prune",
        assets["teacher"],
        tmp_path / "p3",
        "--data",
        assets["data"],
        "--sparsity",
        "0.5",
        "--method",
        "movement",
    )
    sparse.ok()

    heads = tmp_path / "heads"
    cli("heads", assets["teacher"], "--data", assets["data"], "--out", heads).ok()
    for name in ("importance.json", "heads.png", "curve.png", "curve.csv"):
        assert (heads / name).stat().st_size > 0
