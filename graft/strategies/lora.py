"""LoRA (Hu et al., 2021): a trainable low-rank update B A next to each frozen target Linear.

    y = W x + b + scaling * B(A(dropout(x)))      scaling = alpha / r  (rsLoRA: alpha / sqrt(r))

B starts at zero, so the wrapped model starts exactly equal to the pretrained one. Target
modules are chosen by name: graft's ("q", "attn.v", "ffn.up") or the checkpoint's Hugging
Face names ("query", "value", "c_attn"), or a regex ``pattern`` matched against both.
Adapter files use PEFT's format (adapter_config.json + adapter_model.safetensors), so PEFT
loads graft's adapters and graft loads PEFT's.

GPT-2's c_attn is one fused Linear for Q, K and V, which graft keeps as three. Targeting
"c_attn" wraps q, k and v with a LoRA each. In PEFT's format such a module is written as
one LoRA of rank r x (number of wrapped parts): A = [A_q; A_k; A_v] and B = diag(B_q, B_k,
B_v) (zero blocks where a part is not wrapped), with rank_pattern/alpha_pattern entries that
keep each part's scaling, which is exact. A PEFT c_attn adapter loads as three LoRAs that
share a copy of A and split B by rows, also exact.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graft.errors import GraftError
from graft.io.atomic import write_json
from graft.io.hf import read_json
from graft.models.registry import FAMILIES
from graft.models.weights import WeightMap
from graft.strategies.base import Strategy, check_positive, register
from graft.tasks.base import TaskModel, body_of


class LoRALinear(nn.Module):
    """An nn.Linear (kept as ``base_layer``) plus a scaled low-rank update."""

    def __init__(
        self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False
    ):
        super().__init__()
        self.base_layer = base_layer
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        w = base_layer.weight
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as nn.Linear and PEFT
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        y = self.base_layer(x)
        if self.merged:
            return y
        return y + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def delta(self) -> torch.Tensor:
        """scaling * B A, (out, in), computed in float32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """W += scaling * B A, refusing a result that is not finite."""
        if self.merged:
            return
        w = self.base_layer.weight
        merged = w.float() + self.delta()
        if not torch.isfinite(merged).all():
            raise GraftError(
                "LoRA merge would produce non-finite weights (inf or NaN); the base weights are unchanged"
            )
        w.copy_(merged.to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        w = self.base_layer.weight
        w.copy_((w.float() - self.delta()).to(w.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, merged={self.merged}"


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """graft body module name -> its LoRALinear."""
    return {name: m for name, m in body_of(model).named_modules() if isinstance(m, LoRALinear)}


def merge(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.merge()


def unmerge(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every LoRA into its base weights and put the plain nn.Linear back (save_model then works)."""
    body = body_of(model)
    for name, m in lora_modules(model).items():
        m.merge()
        parent, _, child = name.rpartition(".")
        setattr(body.get_submodule(parent) if parent else body, child, m.base_layer)
    return model


# ---------------------------------------------------------------------------------- target names


def weight_map(model: nn.Module) -> WeightMap:
    cfg = body_of(model).config
    return FAMILIES[cfg.family].weight_map(cfg)


def hf_module_names(wmap: WeightMap) -> dict[str, tuple[str, ...]]:
    """HF module name -> graft module name(s): 'encoder.layer.0.attention.self.query' -> ('layers.0.attn.q',)."""
    out = {}
    for hf, target in wmap.names.items():
        if hf.endswith(".weight"):
            names = target if isinstance(target, tuple) else (target,)
            out[hf.removesuffix(".weight")] = tuple(n.removesuffix(".weight") for n in names)
    return out


def matches(name: str, target: str) -> bool:
    """PEFT's rule: the whole name, or its ending after a dot."""
    return name == target or name.endswith("." + target)


def hf_names_of(body: nn.Module) -> dict[str, str]:
    """graft module name -> HF module name. A dual encoder's towers are named each by its own
    family, as the tower's own HF model names them: a sentence encoder put in as CLIP's text tower
    keeps BERT's names ('encoder.layer.0.attention.self.query'), a CLIP tower CLIP's."""
    towers = getattr(body, "towers", None)
    maps = (
        [(f"{name}.", FAMILIES[t.config.family].weight_map(t.config)) for name, t in towers.items()]
        if towers
        else [("", weight_map(body))]
    )
    return {into + n: hf for into, wmap in maps for hf, names in hf_module_names(wmap).items() for n in names}


def select_targets(model: nn.Module, targets: list[str], pattern: str | None) -> list[str]:
    """graft names of the body's Linear layers that ``targets`` / ``pattern`` select, by their graft
    names or their HF names."""
    body = body_of(model)
    linear = {n for n, m in body.named_modules() if isinstance(m, nn.Linear)}
    hf_of = hf_names_of(body)
    regex = re.compile(pattern) if pattern else None
    chosen = []
    for name in sorted(linear, key=lambda n: [int(p) if p.isdigit() else p for p in n.split(".")]):
        candidates = (name, hf_of.get(name, name))
        if any(matches(c, t) for c in candidates for t in targets) or (
            regex and any(regex.fullmatch(c) for c in candidates)
        ):
            chosen.append(name)
    return chosen


def inject(model: nn.Module, names: list[str], r: int, alpha: float, dropout: float, rslora: bool) -> None:
    body = body_of(model)
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = body.get_submodule(parent) if parent else body
        setattr(owner, child, LoRALinear(getattr(owner, child), r, alpha, dropout, rslora))


@register
@dataclass
class LoRA(Strategy):
    """Low-rank adapters on the target Linear layers; the base weights are frozen."""

    name = "lora"
    positional = "r"
    towers = True

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q", "v"])  # graft or HF module names
    pattern: str | None = None  # a regex over graft or HF module names, instead of / besides targets
    rslora: bool = False  # scaling alpha / sqrt(r) (Kalajdzievski, 2023)

    def check(self) -> None:
        super().check()
        check_positive(self, "r", "alpha")
        if not 0 <= self.dropout < 1:
            raise GraftError(f"strategy 'lora': option 'dropout' must be in [0, 1), got {self.dropout}")
        if self.pattern:
            try:
                re.compile(self.pattern)
            except re.error as e:
                raise GraftError(f"strategy 'lora': option 'pattern' is not a valid regex ({e})") from None

    def prepare(self, model: nn.Module) -> nn.Module:
        names = select_targets(
            model, [] if self.pattern and self.targets == ["q", "v"] else self.targets, self.pattern
        )
        if not names:
            raise GraftError(
                f"strategy 'lora': no Linear layer matches targets {self.targets} / pattern {self.pattern!r} "
                "(graft names: q, k, v, o, up, down, gate; or the checkpoint's HF names)"
            )
        inject(model, names, self.r, self.alpha, self.dropout, self.rslora)
        for m in lora_modules(model).values():
            m.lora_A.weight.requires_grad_(True)
            m.lora_B.weight.requires_grad_(True)
        return model


# -------------------------------------------------------------------------- PEFT-format files

PEFT_PREFIX = "base_model.model."
HEAD_FILE = "graft_head.json"


def hf_prefix(model: nn.Module, wmap: WeightMap) -> str:
    """What the HF model class puts before body names: 'bert.' for task models, '' for the bare body."""
    return wmap.prefix if isinstance(model, TaskModel) else ""


def save_adapter(model: nn.Module, folder: str | Path) -> Path:
    """The LoRA weights (and the task head) in PEFT's format; base weights are not written."""
    from safetensors.torch import save_file

    from graft.io.atomic import atomic_path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    loras = lora_modules(model)
    if not loras:
        raise GraftError("save_adapter: the model has no LoRA layers (apply the 'lora' strategy first)")
    first = next(iter(loras.values()))
    wmap = weight_map(model)
    prefix = PEFT_PREFIX + hf_prefix(model, wmap)
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern, alpha_pattern, targets = {}, {}, set()
    for hf, names in hf_module_names(wmap).items():
        parts = [loras.get(n) for n in names]
        if not any(parts):
            continue
        targets.add(hf.rsplit(".", 1)[-1])
        wrapped = [p for p in parts if p is not None]
        if len(names) == 1:
            a, b = wrapped[0].lora_A.weight, wrapped[0].lora_B.weight
        else:  # fused HF module (GPT-2 c_attn): block-diagonal B over the wrapped parts
            a = torch.cat([p.lora_A.weight for p in wrapped])  # (sum r, in)
            outs = [body_of(model).get_submodule(n).out_features for n in names]
            b = a.new_zeros(sum(outs), a.shape[0])  # (sum out, sum r)
            row = col = 0
            for p, out in zip(parts, outs, strict=True):
                if p is not None:
                    b[row : row + out, col : col + p.r] = p.lora_B.weight
                    col += p.r
                row += out
        rank = a.shape[0]
        # the scaling each part had, at the fused rank
        alpha = wrapped[0].scaling * (math.sqrt(rank) if first.rslora else rank)
        if rank != first.r or not math.isclose(alpha, first.alpha):
            rank_pattern[re.escape(hf)] = rank
            alpha_pattern[re.escape(hf)] = alpha
        tensors[f"{prefix}{hf}.lora_A.weight"] = a
        tensors[f"{prefix}{hf}.lora_B.weight"] = b
    modules_to_save = None
    if isinstance(model, TaskModel):
        head_state = model.head.state_dict()
        trained = dict(model.head.named_parameters())  # buffers (BART's final_logits_bias) do not train
        names = {h: n for h, n in model.head.hf_names().items() if n in trained}
        for hf_name, name in names.items():
            tensors[PEFT_PREFIX + hf_name] = head_state[name]
        modules_to_save = sorted({n.split(".")[0] for n in names}) or None
        write_json(folder / HEAD_FILE, {"task": model.task, "config": model.head.hf_config()})
    config = {
        "peft_type": "LORA",
        "task_type": "SEQ_2_SEQ_LM" if getattr(model, "task", None) == "seq2seq" else None,
        "r": first.r,
        "lora_alpha": first.alpha,
        "lora_dropout": first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0,
        "use_rslora": first.rslora,
        "target_modules": sorted(targets),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "modules_to_save": modules_to_save,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "base_model_name_or_path": body_of(model).config.hf_config.get("_name_or_path"),
        "inference_mode": True,
    }
    with atomic_path(folder / "adapter_model.safetensors") as tmp:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp, metadata={"format": "pt"})
    write_json(folder / "adapter_config.json", config)
    return folder


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches the name's ending."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    config_path, weights_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    for path in (config_path, weights_path):
        if not path.exists():
            raise GraftError(
                f"{path}: not found (an adapter folder has adapter_config.json and adapter_model.safetensors)"
            )
    config = read_json(config_path)
    if config.get("peft_type") != "LORA":
        raise GraftError(f"{config_path}: peft_type {config.get('peft_type')!r} is not supported (only LORA)")
    for key, ok in (("use_dora", False), ("lora_bias", False), ("bias", "none")):
        if config.get(key, ok) != ok:
            raise GraftError(
                f"{config_path}: {key}={config[key]!r} is not supported (graft reads {key}={ok!r})"
            )
    return config, load_file(weights_path)


def split_fused(a: torch.Tensor, b: torch.Tensor, outs: list[int], names: tuple[str, ...]) -> list[tuple]:
    """(graft name, A, B) per part of a possibly fused HF module.

    When B is block-diagonal (graft wrote it), each part gets back exactly its own rows of A and
    columns of B, and parts without a block are not wrapped. Otherwise (a PEFT-trained c_attn)
    every part gets all of A and its rows of B.
    """
    blocks = b.split(outs)
    if len(names) > 1:
        used = [set(torch.nonzero(blk.abs().sum(0)).flatten().tolist()) for blk in blocks]
        disjoint = sum(map(len, used)) == len(set().union(*used)) > 0
        if disjoint:
            return [
                (n, a[sorted(cols)], blk[:, sorted(cols)])
                for n, blk, cols in zip(names, blocks, used, strict=True)
                if cols
            ]
    return [(n, a, blk) for n, blk in zip(names, blocks, strict=True)]


def load_adapter(model: nn.Module, folder: str | Path) -> nn.Module:
    """Inject and load a PEFT-format LoRA adapter (graft's or PEFT's) into ``model``, and its head weights.

    ``model`` is the base model, a bare body or a TaskModel with the adapter's head
    (``load_adapter_model`` builds it from a base folder). The LoRA layers train afterwards.
    """
    folder = Path(folder)
    config, tensors = read_adapter(folder)
    wmap = weight_map(model)
    modules = hf_module_names(wmap)
    body = body_of(model)
    source = folder / "adapter_model.safetensors"
    head_tensors = {}
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        m = re.fullmatch(r"(.+)\.(lora_[AB])(?:\.default)?\.weight", name)
        if m is None:
            head_tensors[name] = tensor
            continue
        module = m.group(1)
        if module not in modules and module.startswith(wmap.prefix):
            module = module[len(wmap.prefix) :]
        if module not in modules:
            raise GraftError(
                f"{source}: tensor {key!r} targets {module!r}, which is not a Linear of this {body.config.family} model"
            )
        found.setdefault(module, {})[m.group(2)] = tensor
    rslora = bool(config.get("use_rslora", False))
    dropout = float(config.get("lora_dropout") or 0.0)
    for module, ab in sorted(found.items()):
        if set(ab) != {"lora_A", "lora_B"}:
            raise GraftError(f"{source}: {module!r} has {sorted(ab)} but needs both lora_A and lora_B")
        a, b = ab["lora_A"], ab["lora_B"]
        r = int(pattern_value(config.get("rank_pattern") or {}, module, config["r"]))
        alpha = float(pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"]))
        names = modules[module]
        outs = [body.get_submodule(n).out_features for n in names]
        if a.shape[0] != r or b.shape != (sum(outs), r):
            raise GraftError(
                f"{source}: {module!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                f"which do not fit rank {r} and {sum(outs)} outputs"
            )
        scaling = alpha / math.sqrt(r) if rslora else alpha / r
        for n, a_part, b_part in split_fused(a, b, outs, names):
            rank = a_part.shape[0]
            inject(model, [n], rank, scaling * (math.sqrt(rank) if rslora else rank), dropout, rslora)
            lora = body.get_submodule(n)
            with torch.no_grad():
                lora.lora_A.weight.copy_(a_part)
                lora.lora_B.weight.copy_(b_part)
    if not found:
        raise GraftError(f"{source}: no LoRA tensors found")
    if head_tensors:
        if not isinstance(model, TaskModel):
            raise GraftError(
                f"{source}: the adapter has head tensors ({', '.join(sorted(head_tensors)[:3])}); load it onto a task model"
            )
        names = model.head.hf_names()
        state = {}
        for hf_name, tensor in head_tensors.items():
            if hf_name not in names:
                raise GraftError(
                    f"{source}: tensor {hf_name!r} is not a LoRA weight nor part of the {model.task} head"
                )
            state[names[hf_name]] = tensor
        model.head.load_state_dict(state, strict=False)
    for p in model.parameters():
        p.requires_grad_(False)
    for m in lora_modules(model).values():
        m.lora_A.weight.requires_grad_(True)
        m.lora_B.weight.requires_grad_(True)
    return model


def exportable(model: nn.Module) -> nn.Module:
    """A plain copy of ``model`` that save_model can write in Hugging Face layout.

    LoRA is merged into the base weights. Adapters, prompts and prefixes have no place in a
    HF checkpoint: for those this is a GraftError that says to save the adapter instead.
    """
    import copy

    body = body_of(model)
    extra = [n for n, _ in body.named_modules() if n.endswith((".adapter", "prompt", "prefix"))]
    if extra:
        raise GraftError(
            f"this model has strategy modules ({extra[0]}, ...) that a Hugging Face checkpoint cannot hold; "
            "save the trained model with torch.save(model.state_dict()) or keep the run's checkpoint"
        )
    if not lora_modules(model):
        return model
    return merge_and_unload(copy.deepcopy(model))
