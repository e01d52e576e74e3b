"""LiGO (Wang et al., ICLR 2023): a learned linear growth operator from a trained small model to the target.

The operator maps the small model's (frozen) weights to the target's (LiGO Sec. 3, Eq. 3-6):

* width: for each kind of weight (a module kind shared by all layers: ``*.attn.c_attn``, ``*.ln_1``, the word
  embeddings, ...) one expansion matrix per grown axis, ``W' = A W B^T`` (a bias or LayerNorm vector: ``A v``).
  The axes are ``models.WIDTH_AXES``'s, so grouped-query attention (the LLaMA family) has its own key/value
  expansions (the ``kv`` axis of ``k_proj`` / ``v_proj``), which start as FPI's whole-group head copies;
* depth: for each kind of layer weight, target layer ``l`` is a learned mix ``sum_j D[l, j] W_j`` of the
  small model's layers.

At initialisation ``A`` and ``B`` are bert2BERT's FPI selection matrices (rows one-hot; "/" axes divided by the
copy count, see ``bert2bert``) and ``D`` is StackBERT's stacking map, so the materialised model is exactly
bert2BERT-FPI + stacking. The operator is trained alone on the LM loss for ``ligo_steps`` steps (the target
model's forward runs on the materialised weights via ``torch.func.functional_call``), then merged into plain
weights, after which the model trains as usual. Operator steps are counted in the method's FLOPs: the target
model's training FLOPs at full depth plus the operator's own (measured with ``FlopCounterMode``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from ..method.growth import stacking_map
from ..models import LMLoss, get_layers, layer_path, width_axes, width_key
from .bert2bert import WidthMap


def _slot(key: str) -> str:
    """A ParameterDict/buffer name for a dotted key."""
    return key.replace("*", "L").replace(".", "_").replace("/", "_div")


def selection(index: torch.Tensor, counts: torch.Tensor | None) -> torch.Tensor:
    """The (target x source) matrix with row ``i`` one-hot at ``index[i]`` (divided by its count when given)."""
    m = torch.zeros(len(index), len(counts) if counts is not None else int(index.max()) + 1)
    m[torch.arange(len(index)), index] = 1.0 if counts is None else 1.0 / counts[index]
    return m


class LiGO(nn.Module):
    """The growth operator for ``small`` -> ``target`` (target: the target architecture at full depth)."""

    def __init__(self, small: nn.Module, target: nn.Module, wmap: WidthMap):
        super().__init__()
        self.axes = width_axes(small)
        self.prefix = layer_path(target) + "."
        self.n_small, self.n_large = len(get_layers(small)), len(get_layers(target))
        self.names = [n for n, _ in target.named_parameters()]
        source = {n: p.detach() for n, p in small.named_parameters()}
        self.width, self.depth = nn.ParameterDict(), nn.ParameterDict()
        self.keys: list[str] = []
        stack = stacking_map(self.n_small, self.n_large)
        for name in self.names:
            key = width_key(target, name)
            if key in self.keys:
                continue
            self.keys.append(key)
            if key.startswith("*."):  # the small model's layers, stacked: (n_small, ...)
                w = torch.stack([source[f"{self.prefix}{j}.{key[2:]}"] for j in range(self.n_small)])
            else:
                w = source[name]
            self.register_buffer("src_" + _slot(key), w.clone(), persistent=False)
            module = key.rsplit(".", 1)[0]
            for code in self.axes[key]:
                space = code.rstrip("/")
                if space and _slot(f"{module}|{code}") not in self.width:
                    counts = wmap.counts[space] if code.endswith("/") else None
                    self.width[_slot(f"{module}|{code}")] = nn.Parameter(selection(wmap.index[space], counts))
            if key.startswith("*.") and _slot(module) not in self.depth:
                self.depth[_slot(module)] = nn.Parameter(selection(torch.tensor(stack), None))

    def materialize(self) -> dict[str, torch.Tensor]:
        """The target's parameters (name -> tensor) under the current operator (differentiable)."""
        out = {}
        for key in self.keys:
            w = getattr(self, "src_" + _slot(key))
            layered = key.startswith("*.")
            module = key.rsplit(".", 1)[0]
            for dim, code in enumerate(self.axes[key]):
                if code.rstrip("/"):
                    d = dim + layered
                    w = torch.movedim(torch.movedim(w, d, -1) @ self.width[_slot(f"{module}|{code}")].T, -1, d)
            if layered:
                w = torch.einsum("lj,j...->l...", self.depth[_slot(module)], w)
                out.update({f"{self.prefix}{i}.{key[2:]}": w[i] for i in range(self.n_large)})
            else:
                out[key] = w
        return out

    def flops(self) -> int:
        """FLOPs of one operator update (materialise forward + backward), measured with FlopCounterMode."""
        counter = FlopCounterMode(display=False)
        with counter:
            sum(w.sum() for w in self.materialize().values()).backward()
        self.zero_grad(set_to_none=True)
        return counter.get_total_flops()


def operator_loss(op: LiGO, model: nn.Module, batch: dict[str, torch.Tensor], mlm: bool) -> torch.Tensor:
    """The LM loss of ``model`` run with the operator's materialised weights."""
    params = {"model." + k: v for k, v in op.materialize().items()}
    return functional_call(LMLoss(model, mlm), params, (batch,))


def merge(op: LiGO, model: nn.Module) -> None:
    """Write the materialised weights into ``model``'s own parameters (before any optimizer is built)."""
    with torch.no_grad():
        grown = op.materialize()
        for name, p in model.named_parameters():
            p.copy_(grown[name])
