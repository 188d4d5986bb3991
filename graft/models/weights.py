"""Explicit maps between Hugging Face weight names and graft's, checked key by key and shape by shape."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from graft.errors import GraftError

Target = str | tuple[str, ...]  # a tuple: the HF tensor is several graft tensors concatenated on dim 0


def per_layer(template: dict[str, Target], num_layers: int) -> dict[str, Target]:
    """Expand '{}' in both names of every entry for layers 0..num_layers-1."""
    out: dict[str, Target] = {}
    for i in range(num_layers):
        for hf, graft in template.items():
            out[hf.format(i)] = (
                tuple(g.format(i) for g in graft) if isinstance(graft, tuple) else graft.format(i)
            )
    return out


def pair(hf: str, graft: str, bias: bool = True) -> dict[str, Target]:
    """weight (and bias) entries of one layer."""
    names: dict[str, Target] = {f"{hf}.weight": f"{graft}.weight"}
    if bias:
        names[f"{hf}.bias"] = f"{graft}.bias"
    return names


@dataclass
class WeightMap:
    """HF name -> graft name(s); ``transposed`` lists HF names stored as (in, out) (GPT-2's Conv1D)."""

    names: dict[str, Target]
    transposed: frozenset[str] = frozenset()
    ignored: tuple[str, ...] = ()  # HF name suffixes that are buffers, not weights
    prefix: str = ""  # what task checkpoints put before body names ("bert.", "transformer.")
    # HF name -> how many leading size-1 dims the HF tensor has that graft's lacks (ViT keeps its
    # [CLS] token as (1, 1, H) and its positions as (1, N + 1, H))
    unsqueezed: dict[str, int] = field(default_factory=dict)

    def split_prefix(self, state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        """Body tensors (prefix removed) and everything else (task heads)."""
        roots = {name.split(".")[0] for name in self.names}
        body, rest = {}, {}
        for name, tensor in state.items():
            if self.prefix and name.startswith(self.prefix):
                body[name[len(self.prefix) :]] = tensor
            elif name.split(".")[0] in roots:
                body[name] = tensor
            else:
                rest[name] = tensor
        return body, rest

    def hf_name(self, graft_name: str) -> str:
        return next(
            (
                h
                for h, g in self.names.items()
                if graft_name == g or (isinstance(g, tuple) and graft_name in g)
            ),
            graft_name,
        )

    def to_graft(
        self, state: dict[str, torch.Tensor], expected: dict[str, torch.Size], source: str
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Rename (and transpose / split) a HF state dict; return (body, other tensors).

        ``expected`` holds graft's parameter shapes; every one must be filled with the right
        shape, else a GraftError names the file and the tensor.
        """
        body, rest = self.split_prefix(state)
        out: dict[str, torch.Tensor] = {}
        for hf_name, tensor in body.items():
            target = self.names.get(hf_name)
            if target is None:
                if not (self.ignored and hf_name.endswith(self.ignored)):
                    raise GraftError(
                        f"{source}: unexpected tensor {hf_name!r} (not part of this architecture)"
                    )
                continue
            if hf_name in self.transposed:
                tensor = tensor.t()
            lead = self.unsqueezed.get(hf_name, 0)
            if lead and tensor.shape[:lead] == (1,) * lead:
                tensor = tensor.reshape(tensor.shape[lead:])
            if isinstance(target, tuple):
                sizes = [expected[t][0] if t in expected else -1 for t in target]
                if -1 in sizes or sum(sizes) != tensor.shape[0]:
                    raise GraftError(
                        f"{source}: tensor {hf_name!r} has shape {tuple(tensor.shape)}, "
                        f"which does not split into {target}"
                    )
                for t, part in zip(target, tensor.split(sizes, dim=0), strict=True):
                    out[t] = part.contiguous()
            else:
                out[target] = tensor.contiguous() if hf_name in self.transposed else tensor
        for name, shape in expected.items():
            if name not in out:
                raise GraftError(
                    f"{source}: missing tensor {self.hf_name(name)!r} (expected shape {tuple(shape)})"
                )
            if out[name].shape != shape:
                raise GraftError(
                    f"{source}: tensor {self.hf_name(name)!r} has shape {tuple(out[name].shape)} but the config "
                    f"implies {tuple(shape)}"
                )
        return out, rest

    def to_hf(self, state: dict[str, torch.Tensor], prefix: bool = False) -> dict[str, torch.Tensor]:
        """graft state dict -> HF names (the inverse of to_graft)."""
        out = {}
        for hf_name, target in self.names.items():
            names = target if isinstance(target, tuple) else (target,)
            missing = [n for n in names if n not in state]
            if missing:  # e.g. a layer wrapped by a strategy: never write a partial checkpoint
                raise GraftError(f"cannot save: parameter {missing[0]!r} is missing (for {hf_name!r})")
            tensor = (
                torch.cat([state[n] for n in names], dim=0) if isinstance(target, tuple) else state[target]
            )
            if hf_name in self.transposed:
                tensor = tensor.t()
            tensor = tensor.reshape((1,) * self.unsqueezed.get(hf_name, 0) + tuple(tensor.shape))
            out[(self.prefix if prefix else "") + hf_name] = tensor.contiguous()
        return out
