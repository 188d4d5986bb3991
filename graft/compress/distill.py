"""Knowledge distillation: a smaller student learns from a fine-tuned teacher (Hinton et al. 2015).

The student is built from the teacher, keeping some of its layers with their weights (DistilBERT
kept every other one), or is a fresh smaller config, or a model folder of its own (recipe's
model.path) that shares the teacher's vocabulary. Its loss, weighted as the recipe's ``distill:``
section says:

- soft targets: KL(teacher || student) of the logits at temperature T, times T^2 (so that the
  gradients keep their size as T changes), per example (classification) or per token;
- hard labels: the task head's own loss on the data's labels;
- hidden states (TinyBERT): MSE between each student layer and the teacher layer it maps to,
  through a learned projection when the widths differ;
- attention (MiniLM): KL between the last layer's self-attention distributions of teacher and
  student (per head when both have as many heads, else of the heads' average);
- value relation (MiniLM's eq. 4-5): the same KL between the last layer's value-value relations,
  softmax(V V^T / sqrt(d)) per head, which carries what attention's values hold whatever the widths.

Unlabelled text (``distill.transfer``) adds training examples that the teacher labels (its
predictions, the same ones ``graft predict`` writes) before training starts. Training is graft's
Trainer, given the ``Distiller`` module: its forward returns the student's logits and this loss,
and the run folder's model is the student.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from graft.errors import GraftError
from graft.tasks import HEADS, TaskModel
from graft.tasks.base import TaskOutput, body_inputs

log = logging.getLogger("graft")

TASKS = ("classification", "token-classification", "causal-lm")  # tasks whose logits are distributions


def soft_loss(
    student: torch.Tensor,  # (..., C) logits
    teacher: torch.Tensor,  # (..., C) logits
    temperature: float,
    keep: torch.Tensor | None = None,  # (...) bool: the items that count (real tokens)
) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), summed over classes, mean over items."""
    log_p_s = F.log_softmax(student.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher.float() / temperature, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)  # (...)
    if keep is not None:
        kl = kl[keep]
    return kl.mean() * temperature**2


def attention_loss(student: torch.Tensor, teacher: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """KL(teacher || student) of (B, nh, T, S) attention distributions, mean over heads and real
    queries; heads averaged first when the two models have different numbers of them."""
    if student.shape[1] != teacher.shape[1]:
        student, teacher = student.mean(1, keepdim=True), teacher.mean(1, keepdim=True)
    t = teacher.float()
    kl = (t * (t.clamp_min(1e-12).log() - student.float().clamp_min(1e-12).log())).sum(-1)  # (B, nh, T)
    if keep is not None:
        kl = kl.transpose(1, 2)[keep]  # (real queries, nh)
    return kl.mean()


def value_relation(
    values: torch.Tensor,  # (B, nh, T, hd)
    mask: torch.Tensor | None,  # (B, T) bool: the real tokens
) -> torch.Tensor:  # (B, nh, T, T), rows sum to 1 over the real tokens
    """MiniLM's value relation (eq. 4): softmax(V V^T / sqrt(hd)) per head, padding keys left out."""
    v = values.float()
    scores = v @ v.transpose(-1, -2) / math.sqrt(v.shape[-1])  # (B, nh, T, T)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return scores.softmax(-1)


def last_values(model: TaskModel, hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
    """The values (B, nkv, T, hd) of the last block's self-attention, from its input (the hidden
    states before the last entry; a model's final norm is applied to the last entry only)."""
    body = model.body
    block = body.layers[body.layer_order[-1]]
    x = hidden_states[-2]  # (B, T, H): the last block's input
    pre = block.attn_norm(x) if block.prenorm else x
    attn = block.attn
    B, T = x.shape[:2]
    return attn.v(pre).view(B, T, attn.num_kv_heads, attn.head_dim).transpose(1, 2)  # (B, nkv, T, hd)


class Distiller(nn.Module):
    """The student, trained on the distillation loss against a frozen ``teacher``.

    The teacher is not a submodule (no gradients, not in checkpoints or the optimizer); it moves
    with the distiller (``_apply``). ``projection`` maps student hidden states to the teacher's width
    when they differ (trained, not saved with the student). ``layer_map[m]``: the teacher layer
    whose output student layer m learns (hidden-state loss).
    """

    def __init__(
        self,
        student: TaskModel,
        teacher: TaskModel,
        temperature: float = 2.0,
        soft: float = 0.5,
        hard: float = 0.5,
        hidden: float = 0.0,
        attention: float = 0.0,
        layer_map: Sequence[int] | None = None,
        value: float = 0.0,
    ) -> None:
        super().__init__()
        check_pair(student, teacher)
        self.student = student
        object.__setattr__(self, "teacher", teacher.eval())
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.temperature, self.weights = temperature, {"soft": soft, "hard": hard, "hidden": hidden}
        self.weights["attention"], self.weights["value"] = attention, value
        s, t = student.body.config, teacher.body.config
        self.layer_map = list(layer_map) if layer_map is not None else uniform_map(s.num_layers, t.num_layers)
        self.projection = (
            nn.Linear(s.hidden_size, t.hidden_size) if hidden and s.hidden_size != t.hidden_size else None
        )

    @property
    def head(self) -> nn.Module:  # what the Trainer counts items with
        return self.student.head

    @property
    def trained(self) -> TaskModel:  # what the Trainer saves as the run's model
        return self.student

    def _apply(self, fn, recurse: bool = True):  # .to(device/dtype) moves the teacher too
        self.teacher._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def outputs(self, model: TaskModel, batch: dict[str, Any]) -> tuple[torch.Tensor, Any]:
        hidden = self.weights["hidden"] > 0 or self.weights["value"] > 0  # values come from the last input
        attention = self.weights["attention"] > 0
        inputs = body_inputs(model.head, batch)
        out = model.body(**inputs, output_hidden_states=hidden, output_attentions=attention)
        return model.head(out, batch), out

    def forward(self, **batch: Any) -> TaskOutput:
        logits, out = self.outputs(self.student, batch)
        if not self.training and "labels" not in batch:
            return TaskOutput(logits, None, out)
        with torch.no_grad():
            t_logits, t_out = self.outputs(self.teacher, batch)
        labels = batch.get("labels")
        keep = real_items(self.student.task, batch)
        w = self.weights
        loss = w["soft"] * soft_loss(logits, t_logits, self.temperature, keep)
        if w["hard"] and labels is not None:
            loss = loss + w["hard"] * self.student.head.loss(logits, labels, batch)
        tokens = batch["attention_mask"].bool() if "attention_mask" in batch else None  # (B, T)
        if w["hidden"]:
            pairs = [(0, 0)] + [(m + 1, t + 1) for m, t in enumerate(self.layer_map)]  # embeddings too
            mse = []
            for m, t in pairs:
                h = out.hidden_states[m]  # (B, T, Hs)
                h = self.projection(h) if self.projection is not None else h  # (B, T, Ht)
                diff = F.mse_loss(h.float(), t_out.hidden_states[t].float(), reduction="none").mean(-1)
                mse.append(diff[tokens].mean() if tokens is not None else diff.mean())
            loss = loss + w["hidden"] * torch.stack(mse).mean()
        if w["attention"]:
            loss = loss + w["attention"] * attention_loss(out.attentions[-1], t_out.attentions[-1], tokens)
        if w["value"]:
            relations = [
                value_relation(last_values(m, o.hidden_states), tokens)
                for m, o in ((self.student, out), (self.teacher, t_out))
            ]
            loss = loss + w["value"] * attention_loss(*relations, tokens)
        return TaskOutput(logits, loss, out)


def real_items(task: str, batch: dict[str, Any]) -> torch.Tensor | None:
    """Which logits count: per example (classification: all), labelled tokens, or real tokens."""
    if task == "classification":
        return None
    labels = batch.get("labels")
    if task == "token-classification" and labels is not None:
        return labels != -100
    return batch["attention_mask"].bool() if "attention_mask" in batch else None


def uniform_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Student layer m learns teacher layer round((m + 1) * Lt / Ls) - 1 (the last learns the last)."""
    return [round((m + 1) * teacher_layers / student_layers) - 1 for m in range(student_layers)]


def check_pair(student: TaskModel, teacher: TaskModel) -> None:
    """One line for each way a student cannot learn from this teacher."""
    if not isinstance(teacher, TaskModel) or not isinstance(student, TaskModel):
        raise GraftError("distill: the teacher and the student must be task models (fine-tuned, with a head)")
    if teacher.task not in TASKS:
        raise GraftError(f"distill: a {teacher.task} teacher; distillation is for {', '.join(TASKS)}")
    if getattr(teacher.head, "problem_type", "single_label") != "single_label":
        raise GraftError(
            "distill: the teacher is a multi-label or regression classifier; soft targets need classes"
        )
    if student.task != teacher.task:
        raise GraftError(
            f"distill: the student is a {student.task} model and the teacher a {teacher.task} one"
        )
    s, t = student.body.config, teacher.body.config
    if s.vocab_size != t.vocab_size:
        raise GraftError(
            f"distill: the student's vocabulary ({s.vocab_size} tokens) differs from the teacher's"
            f" ({t.vocab_size}); a student reads the teacher's tokens"
        )
    if s.hidden_size > t.hidden_size:
        raise GraftError(
            f"distill: the student (hidden_size {s.hidden_size}) is wider than the teacher ({t.hidden_size})"
        )
    s_labels, t_labels = getattr(student.head, "id2label", None), getattr(teacher.head, "id2label", None)
    if s_labels is not None and list(s_labels) != list(t_labels):
        raise GraftError(
            f"distill: the student's labels {list(s_labels)} are not the teacher's {list(t_labels)}"
        )


def keep_layers(teacher: TaskModel, layers: Sequence[int]) -> TaskModel:
    """A student that is the teacher with only ``layers`` (teacher indices, in order), weights copied."""
    cfg = teacher.body.config
    depth = cfg.num_layers
    bad = [i for i in layers if not 0 <= i < depth]
    if bad or not layers:
        raise GraftError(
            f"distill.layers: {bad[0] if bad else 'none'} is not a layer of the teacher (0 to {depth - 1})"
        )
    if sorted(set(layers)) != list(layers):
        raise GraftError(f"distill.layers: {list(layers)} must be distinct and increasing")
    student = copy.deepcopy(teacher)
    body, scfg = student.body, student.body.config
    scfg.num_layers = len(layers)
    if cfg.layer_order:  # shared blocks (ALBERT): the blocks stay, applied at fewer depths
        scfg.layer_order = [cfg.layer_order[i] for i in layers]
        body.layer_order = list(scfg.layer_order)
        return student
    body.layers = nn.ModuleList(body.layers[i] for i in layers)
    body.layer_order = list(range(len(layers)))
    for new, block in enumerate(body.layers):
        block.attn.layer = new  # (the cache's index)
        if block.cross_attn is not None:
            block.cross_attn.layer = new
    if scfg.heads_per_layer is not None:
        scfg.heads_per_layer = [cfg.heads_per_layer[i] for i in layers]
        pruned = cfg.hf_config.get("pruned_heads") or {}
        scfg.hf_config = {
            **cfg.hf_config,
            "pruned_heads": {str(n): pruned[str(i)] for n, i in enumerate(layers) if str(i) in pruned},
        }
    if scfg.intermediate_sizes is not None:
        scfg.intermediate_sizes = [cfg.intermediate_sizes[i] for i in layers]
    return student


def fresh_student(teacher: TaskModel, overrides: dict[str, Any]) -> TaskModel:
    """A new, smaller model of the teacher's family: its config with ``overrides`` (num_layers,
    hidden_size, num_heads, intermediate_size...), initialized as transformers initializes BERT
    (N(0, 0.02)); the teacher's embeddings are copied when the widths agree."""
    from graft.nn import Transformer, TransformerConfig

    t = teacher.body.config
    values = {**t.to_dict(), "heads_per_layer": None, "intermediate_sizes": None, "layer_order": None}
    if {"hidden_size", "num_heads"} & set(overrides) and "head_dim" not in overrides:
        values["head_dim"] = None
    if "num_heads" in overrides and "num_kv_heads" not in overrides:
        values["num_kv_heads"] = None
    try:
        cfg = TransformerConfig.from_dict({**values, **overrides}, "distill.student")
    except TypeError as e:
        raise GraftError(f"distill.student: {e}") from None
    cfg.hf_config = {k: v for k, v in t.hf_config.items() if k != "pruned_heads"}
    if cfg.hidden_size > t.hidden_size:
        raise GraftError(
            f"distill: the student (hidden_size {cfg.hidden_size}) is wider than the teacher ({t.hidden_size})"
        )
    body = Transformer(cfg)
    for module in body.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
    embed_state = teacher.body.embed.state_dict()
    mine = body.embed.state_dict()
    if all(k in mine and mine[k].shape == v.shape for k, v in embed_state.items()):
        body.embed.load_state_dict(embed_state)
    head_class = HEADS[teacher.task]
    head = head_class(body, **head_class.options_from_hf(teacher.head.hf_config()))
    student = TaskModel(body, head)
    if getattr(teacher.body, "kernels", None) is not None:
        import graft.kernels

        graft.kernels.optimize(student)
    return student


def build_student(recipe: Any, teacher: TaskModel) -> tuple[TaskModel, list[int] | None]:
    """The student the recipe asks for, and the teacher layer each of its layers learns (or None)."""
    from graft.io.hf import resolve
    from graft.loading import load_config, load_model

    d = recipe.distill
    depth = teacher.body.config.num_layers
    ways = [k for k in ("layers", "every", "first", "student") if getattr(d, k)] + (
        ["model.path"] if recipe.model.path else []
    )
    if len(ways) != 1:
        raise GraftError(
            "distill: say how to build the student with one of distill.layers, distill.every, distill.first,"
            f" distill.student or model.path (found {', '.join(ways) or 'none'})"
        )
    if d.every:
        if d.every > depth:
            raise GraftError(f"distill.every: {d.every} is more than the teacher's {depth} layers")
        layers = list(range(d.every - 1, depth, d.every))
    elif d.first:
        if d.first > depth:
            raise GraftError(f"distill.first: {d.first} is more than the teacher's {depth} layers")
        layers = list(range(d.first))
    elif d.layers:
        layers = list(d.layers)
    elif d.student:
        return fresh_student(teacher, dict(d.student)), None
    else:  # a model of its own: its vocabulary checked before anything loads; the teacher's labels
        folder = resolve(recipe.model.path)
        cfg, t = load_config(folder)[1], teacher.body.config
        if cfg.vocab_size != t.vocab_size:
            raise GraftError(
                f"distill: the student's vocabulary ({cfg.vocab_size} tokens, model.path) differs from the"
                f" teacher's ({t.vocab_size}); a student reads the teacher's tokens"
            )
        if getattr(cfg, "hidden_size", 0) > t.hidden_size:
            raise GraftError(
                f"distill: the student (hidden_size {cfg.hidden_size}, model.path) is wider than the teacher"
                f" ({t.hidden_size})"
            )
        options = HEADS[teacher.task].options_from_hf(teacher.head.hf_config())
        student = load_model(
            folder, task=teacher.task, kernels=recipe.model.kernels, to_train=True, **options
        )
        return student, None
    return keep_layers(teacher, layers), layers


def label_transfer(
    teacher: TaskModel, tokenizer: Any, path: Path, max_length: int, batch_size: int = 32
) -> list[dict[str, Any]]:
    """The records of unlabelled file ``path``, labelled with the teacher's predictions (a causal
    LM's text is its own label)."""
    from graft.data import load_records
    from graft.tasks.collate import record_options
    from graft.tasks.predict import predict

    records = list(load_records(path, None, None, **record_options(teacher.head, False)))
    if not records:
        raise GraftError(f"distill.transfer: {path}: no records")
    if teacher.task == "causal-lm":
        return records
    key = "label" if teacher.task == "classification" else "tags"
    return [{**r, key: p[key]} for r, p in predict(teacher, tokenizer, records, batch_size, max_length)]


def run_distill(
    recipe: Any, resume: bool = False, quiet: bool = False, overwrite: bool = False
) -> dict[str, Any]:
    """Distil the recipe's teacher into a student, as graft.train.build.run_recipe trains a model."""
    from graft.io.atomic import write_json
    from graft.io.hf import resolve
    from graft.loading import load_model
    from graft.tokenizer import Tokenizer
    from graft.train.build import build_trainer
    from graft.train.loop import check_output

    d = recipe.distill
    if not d.teacher:
        raise GraftError("distill.teacher: no teacher given (a fine-tuned task model folder)")
    check_output(Path(recipe.train.output), resume, overwrite)
    folder = resolve(d.teacher)
    teacher = load_model(folder, kernels=recipe.model.kernels)
    if not isinstance(teacher, TaskModel):
        raise GraftError(
            f"distill.teacher: {folder} is a bare model; the teacher must be fine-tuned (a task model)"
        )
    if recipe.task.name != teacher.task:
        raise GraftError(f"task.name: the teacher is a {teacher.task} model; set task.name={teacher.task}")
    torch.manual_seed(recipe.train.seed)
    student, layers = build_student(recipe, teacher)
    distiller = Distiller(
        student, teacher, d.temperature, d.soft, d.hard, d.hidden, d.attention, layers, value=d.value
    )
    extra = []
    if d.transfer:
        extra = label_transfer(
            teacher, Tokenizer.from_folder(folder), Path(d.transfer), recipe.data.max_length
        )
        log.info("distill: %d transfer examples labelled by the teacher", len(extra))
    taught = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, path=str(folder)))
    trainer = build_trainer(taught, quiet=quiet, model=distiller, extra_train=extra)
    result = trainer.fit(resume=resume, overwrite=overwrite)
    s, t = student.body.config, teacher.body.config
    result["student"] = {"layers": s.num_layers, "hidden_size": s.hidden_size, "parameters": count(student)}
    result["teacher"] = {"layers": t.num_layers, "hidden_size": t.hidden_size, "parameters": count(teacher)}
    if trainer.test_data:
        result.update({f"test/{k}": v for k, v in trainer.evaluate(trainer.test_data).items()})
    if trainer.rank == 0:
        write_json(trainer.out / "result.json", result)
    return result


def train_steps(model: nn.Module, batches: Sequence[dict[str, Any]], steps: int, lr: float) -> list[float]:
    """``steps`` AdamW steps at ``lr`` on ``batches`` (cycled) of a task model or a Distiller: a short
    fine-tune (prune's recovery, graft compress's students). Returns each step's loss; ends in eval mode."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        loss = model(**batches[step % len(batches)]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
