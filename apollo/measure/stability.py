"""Stability of depth expansion (paper Tables 2-3, Fig. 5): loss, gradient norms and output activations.

The paper's claim: right after an ``N -> 2N`` expansion, interpolation (Eq. 12) gives a lower loss and smaller
gradient norms than stacking (Eq. 11) and keeps the distribution of the output activations. ``measure`` scores
one model on fixed validation batches: the token-weighted loss, the total gradient norm of each batch's LM loss
over all parameters, and the output of the last executed layer (for GPT-2, the residual stream before the final
LayerNorm). It leaves the model's parameters, gradients, train/eval mode and the global torch RNG as they were,
so ``GrowthProbe`` can run it inside ``apollo.runtime.train.train`` at a growth without changing the run.
"""

from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass, field

import torch
from torch import nn

from ..method.growth import expand_layers, shared_layers
from ..models import get_layers, lm_loss

SAMPLE_PER_BATCH = 8192  # activation values kept per batch for the histograms (every k-th element, no RNG)


@dataclass
class Measurement:
    """One model on one set of validation batches."""

    val_loss: float
    grad_norms: list[float]  # one total gradient norm per batch
    act_mean: float
    act_std: float
    act_max_abs: float
    act_sample: torch.Tensor = field(repr=False)  # a strided sample of the output activations

    def row(self) -> dict:
        """The numbers of the study's tables (no activation sample)."""
        g = self.grad_norms
        return {"val_loss": self.val_loss, "grad_norm_min": min(g), "grad_norm_median": statistics.median(g),
                "grad_norm_max": max(g), "act_mean": self.act_mean, "act_std": self.act_std,
                "act_max_abs": self.act_max_abs, "grad_norms": g}


def total_grad_norm(model: nn.Module) -> float:
    """L2 norm of all parameter gradients together (what ``clip_grad_norm_`` sees); 0 if there are none."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def measure(model: nn.Module, batches: list[dict], mlm: bool, positions: list[int] | None = None) -> Measurement:
    """Loss, per-batch gradient norms and output-activation statistics of ``model`` on ``batches``.

    ``positions``: the layer map to run (``shared_layers``); default all live layers in order. The loss is the
    mean per predicted token over all batches (as ``apollo.runtime.train.evaluate``); each gradient norm is that of one
    batch's mean loss. Runs in eval mode; parameters, gradients, mode and the torch RNG state are restored.
    """
    params = list(model.parameters())
    saved_grads = [p.grad for p in params]
    rng = torch.get_rng_state()
    was_training = model.training
    positions = list(range(len(get_layers(model)))) if positions is None else positions
    last: list[torch.Tensor] = []

    def keep_output(module, inputs, output):  # the last call in a forward is the last position's layer
        last[:] = [output[0] if isinstance(output, tuple) else output]

    hooks = [layer.register_forward_hook(keep_output) for layer in get_layers(model)]
    total_loss, count, norms, samples = 0.0, 0, [], []
    n_act, s1, s2, max_abs = 0, 0.0, 0.0, 0.0
    model.eval()
    try:
        with shared_layers(model, positions):
            for batch in batches:
                for p in params:
                    p.grad = None
                loss = lm_loss(model, batch, mlm)
                loss.backward()
                norms.append(total_grad_norm(model))
                labels = batch["labels"] if mlm else batch["labels"][:, 1:]  # causal LMs predict from position 1
                n = int((labels != -100).sum())
                total_loss += float(loss.detach()) * n
                count += n
                act = last[0].detach().double().flatten()
                n_act += act.numel()
                s1 += float(act.sum())
                s2 += float((act * act).sum())
                max_abs = max(max_abs, float(act.abs().max()))
                samples.append(act[:: max(1, act.numel() // SAMPLE_PER_BATCH)].float())
    finally:
        for h in hooks:
            h.remove()
        for p, g in zip(params, saved_grads, strict=True):
            p.grad = g
        model.train(was_training)
        torch.set_rng_state(rng)
    mean = s1 / max(1, n_act)
    std = max(0.0, s2 / max(1, n_act) - mean * mean) ** 0.5
    return Measurement(total_loss / max(1, count), norms, mean, std, max_abs, torch.cat(samples))


def expanded(model: nn.Module, n_new: int, kind: str) -> nn.Module:
    """A deep copy of ``model`` with its layers expanded to ``n_new`` by ``kind`` (interpolation | stacking).

    New layer ``j`` is a copy of source layer ``layer_map(kind, N, n_new)[j]``; embeddings and head are copies
    of the source's. The source model is not changed.
    """
    new = copy.deepcopy(model)
    expand_layers(new, n_new, kind)
    return new


class StopAtGrowth(Exception):
    """Raised by ``GrowthProbe`` to end a training run once the growth of interest is measured."""


class GrowthProbe:
    """An ``on_grow`` hook for ``apollo.runtime.train.train`` measuring both sides of the ``n_from -> n_to`` growth.

    Before the growth it measures the ``n_from`` live layers at their own depth (``before@live``) and at full
    depth through the run's layer map (``before@full``, the weights shared as Apollo runs them); after it, the
    ``n_to`` layers at full depth (``after``). Then it raises ``StopAtGrowth`` (when ``stop``), so the caller
    trains only up to the switch. Measuring leaves the model and the RNG unchanged (see ``measure``).
    """

    def __init__(self, batches: list[dict], mlm: bool, n_from: int, n_to: int, stop: bool = True):
        self.batches, self.mlm, self.n_from, self.n_to, self.stop = batches, mlm, n_from, n_to, stop
        self.results: dict[str, Measurement] = {}
        self.step: int | None = None

    def __call__(self, when: str, step: int, model: nn.Module, positions: list[int]) -> None:
        live = len(get_layers(model))
        if when == "before" and live == self.n_from:
            self.step = step
            self.results["before@live"] = measure(model, self.batches, self.mlm)
            self.results["before@full"] = measure(model, self.batches, self.mlm, positions)
        elif when == "after" and live == self.n_to and "before@full" in self.results:
            self.results["after"] = measure(model, self.batches, self.mlm, positions)
            if self.stop:
                raise StopAtGrowth(f"measured the {self.n_from} -> {self.n_to} growth at step {step}")
