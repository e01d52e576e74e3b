"""Layer maps (Eq. 11, 12), weight sharing across a sampled depth, and growth at a stage boundary.

Sharing: one forward at depth ``d`` runs live layer ``map[j]`` at position ``j``. We swap the model's
layer list for the pass (the same modules, by reference), so the HF forward code is untouched and
parameter names stay ``...layer.{i}...`` for the ``N_s`` live layers. The config's depth (and per-layer
lists such as ``layer_types``) says ``d`` during the pass: LLaMA-style models run only
``layers[:config.num_hidden_layers]``.

Growth is a rebuild: new layers are deep copies of their source layers, and the optimizer is built
afresh over the new parameters, with each new parameter's AdamW state copied from its source
(``copy``) or started empty (``reset``). The learning-rate schedule is global and not restarted.

``new_layers="zeroed"`` (apollo-plus, not in the paper): every copy after the first of a source layer
has its residual-branch output projections zeroed, so it adds nothing to the stream at first. A pre-LN
model (GPT-2, LLaMA) then computes exactly what it did before growth at its native depth (one pass
through the live layers, no sharing); in the spirit of MSG / LEMON, but the zeroed copy keeps its
source's attention and MLP input weights, so it starts from learned features rather than noise.
For post-LN BERT the zeroed layer still applies its LayerNorms, so growth is close to, not exactly,
function-preserving.

``new_layers="random"`` (zero/one-layer expansion, Bu 2025): every repeat copy is replaced by the freshly
initialised layer at its position of the L-layer init (the layers Scratch starts from); growth from zero
layers makes every layer fresh. Fresh layers start with empty AdamW state.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ..config import ApolloError
from ..models import depth_state, get_layers, layer_path, renumber_layers, residual_outputs, set_layers

GROWTH = ("interpolation", "stacking", "middle")
MOMENTS = ("copy", "reset", "fresh")  # fresh: a new AdamW for every parameter (G_stack)
NEW_LAYERS = ("copy", "zeroed", "random")
FRESH = -1  # the source of a freshly initialised layer (new_layers="random")


def interpolation_map(n_live: int, depth: int) -> list[int]:
    """Eq. 12: position ``j`` of a ``depth``-deep pass uses live weight ``(j * n_live) // depth``.

    Each live weight fills one contiguous block, order kept: ``(3, 8) -> [0,0,0,1,1,1,2,2]``.
    The same rule is the expansion map ``N_old -> N_new`` (``(3, 6) -> [0,0,1,1,2,2]``).
    """
    return [(j * n_live) // depth for j in range(depth)]


def stacking_map(n_live: int, depth: int) -> list[int]:
    """Eq. 11: position ``j`` uses ``j mod n_live``; a partial last block takes the top layers.

    ``(3, 8) -> [0,1,2,0,1,2,1,2]``, ``(6, 9) -> [0,1,2,3,4,5,3,4,5]``. As an expansion map it is
    StackBERT's doubling: new layer ``j`` copies old layer ``j mod N_old``.
    """
    full, rest = divmod(depth, n_live)
    return [j % n_live for j in range(full * n_live)] + list(range(n_live - rest, n_live))


def middle_map(n_live: int, depth: int) -> list[int]:
    """MIDAS (Saunshi et al. 2024): the layers form blocks of ``k = depth - n_live``; block ``ceil(n / 2)``
    (1-based, ``n = n_live / k`` blocks) is duplicated and the copy inserted right after it. ``k > n_live``
    repeats the rule on the result (its layers keep their live sources).

    ``(4, 6) -> [0,1,0,1,2,3]``, ``(6, 8) -> [0,1,2,3,2,3,4,5]``, ``(6, 9) -> [0,1,2,0,1,2,3,4,5]``,
    ``(3, 6) -> [0,1,2,0,1,2]`` (= stacking). Order is kept and every live layer runs, as with the other maps.
    """
    positions = list(range(n_live))
    while len(positions) < depth:
        k = min(depth - len(positions), len(positions))
        start = min((-(-len(positions) // (2 * k)) - 1) * k, len(positions) - k)  # (ceil(n / 2) - 1) * k
        positions = positions[:start + k] + positions[start:]
    return positions


_MAPS = {"interpolation": interpolation_map, "stacking": stacking_map, "middle": middle_map}


def layer_map(kind: str, n_live: int, depth: int) -> list[int]:
    """Position ``j`` of a ``depth``-deep pass over ``n_live`` live layers runs live layer ``map[j]`` (also the
    expansion map ``n_live -> depth``). A zero-layer model has the empty map at depth 0 and no other."""
    if kind not in GROWTH:
        raise ApolloError(f"unknown growth {kind!r} (choose from {', '.join(GROWTH)})")
    if n_live == depth == 0:
        return []
    if not 1 <= n_live <= depth:
        raise ApolloError(f"cannot map {n_live} live layers onto depth {depth}")
    return _MAPS[kind](n_live, depth)


def eval_map(kind: str, n_live: int, depth: int) -> list[int]:
    """The positions validation runs: all ``depth`` of them through the current map, or none for a model with
    no live layer yet (zero-layer expansion: embeddings and head only)."""
    return layer_map(kind, n_live, depth) if n_live else []


@contextlib.contextmanager
def shared_layers(model: nn.Module, positions: list[int]) -> Iterator[None]:
    """Run the model with live layer ``positions[j]`` at position ``j`` (shared by reference).

    Shared layers keep their live ``layer_idx``, so the pass must not use a KV cache (training runs without).
    """
    live, depth = get_layers(model), depth_state(model.config)
    set_layers(model, nn.ModuleList([live[i] for i in positions]), source=positions)
    try:
        yield
    finally:
        set_layers(model, live, depth_field=False)
        for name, value in depth.items():
            setattr(model.config, name, value)


def zeroed_params(model: nn.Module, layers: nn.ModuleList, source: list[int]) -> list[nn.Parameter]:
    """The residual-output parameters of every repeat copy (a later copy of an already-copied source)."""
    return [p for j, i in enumerate(source) if i in source[:j]
            for proj in residual_outputs(model, layers[j]) for p in proj.parameters(recurse=False)]


def expansion_source(kind: str, n_old: int, n_new: int, new_layers: str) -> list[int]:
    """The source of each of the ``n_new`` layers: ``layer_map``, with every repeat copy ``FRESH`` under
    ``new_layers="random"`` (and every layer, growing from zero layers)."""
    if n_old == 0:
        if new_layers != "random":
            raise ApolloError("growth from zero layers has no layer to copy: it needs --new-layers random")
        return [FRESH] * n_new
    source = layer_map(kind, n_old, n_new)
    if new_layers == "random":
        source = [FRESH if i in source[:j] else i for j, i in enumerate(source)]
    return source


def expand_layers(model: nn.Module, n_new: int, kind: str, new_layers: str = "copy",
                  fresh: Callable[[], nn.ModuleList] | None = None) -> list[int]:
    """Replace the ``N_old`` live layers by ``n_new`` new ones; return the source of each (``FRESH``: new init).

    With ``new_layers="zeroed"`` each repeat copy (not the first copy of its source) gets zero
    residual-branch outputs; with ``"random"`` it is layer ``j`` of ``fresh()`` (the L-layer init's layers).
    This runs on fresh modules before any optimizer sees them.
    """
    if new_layers not in NEW_LAYERS:
        raise ApolloError(f"unknown new-layers policy {new_layers!r} (choose from {', '.join(NEW_LAYERS)})")
    live = get_layers(model)
    source = expansion_source(kind, len(live), n_new, new_layers)
    if FRESH in source and fresh is None:
        raise ApolloError("new_layers='random' needs the fresh layers of the L-layer init (fresh=...)")
    init = fresh() if FRESH in source else None
    if init is not None and len(init) < n_new:
        raise ApolloError(f"{len(init)} fresh layers cannot fill {n_new} positions")
    new = nn.ModuleList([copy.deepcopy(live[i] if i != FRESH else init[j]) for j, i in enumerate(source)])
    if new_layers == "zeroed":
        with torch.no_grad():
            for p in zeroed_params(model, new, source):
                p.zero_()
    renumber_layers(new)
    set_layers(model, new, source=source)
    return source


def _source_name(name: str, prefix: str, source: list[int]) -> str:
    if not name.startswith(prefix):
        return name
    index, rest = name[len(prefix):].split(".", 1)
    return f"{prefix}{source[int(index)]}.{rest}"


def grow(model: nn.Module, optimizer: torch.optim.Optimizer, n_new: int, kind: str, moments: str,
         make_optimizer: Callable[[nn.Module], torch.optim.Optimizer], new_layers: str = "copy",
         fresh: Callable[[], nn.ModuleList] | None = None) -> tuple[torch.optim.Optimizer, list[int]]:
    """Expand the live layers to ``n_new`` and rebuild the optimizer over the new parameters.

    ``moments='copy'``: each new layer's AdamW state (step, exp_avg, exp_avg_sq) is a copy of its
    source layer's; ``'reset'``: new layers start with empty state. Non-layer parameters (embeddings,
    head) are the same objects and keep their state, except under ``'fresh'``: every parameter starts empty,
    as a newly built optimizer would (G_stack trains the stacked model as a new run). Zeroed projections
    (``new_layers="zeroed"``) always start with empty state: their source's moments describe a weight they no
    longer hold; so do fresh layers (``new_layers="random"``, built by ``fresh``). Returns the new optimizer
    and the source map.
    """
    if moments not in MOMENTS:
        raise ApolloError(f"unknown moments policy {moments!r} (choose from {', '.join(MOMENTS)})")
    prefix = layer_path(model) + "."
    old_state = {name: optimizer.state.get(p, {}) for name, p in model.named_parameters()}
    source = expand_layers(model, n_new, kind, new_layers, fresh)
    zeroed = {id(p) for p in zeroed_params(model, get_layers(model), source)} if new_layers == "zeroed" else set()
    new_optimizer = make_optimizer(model)
    if moments == "fresh":
        return new_optimizer, source
    for name, p in model.named_parameters():
        if name.startswith(prefix) and (moments == "reset" or id(p) in zeroed
                                        or source[int(name[len(prefix):].split(".", 1)[0])] == FRESH):
            continue
        state = old_state.get(_source_name(name, prefix, source), {})
        if state:
            new_optimizer.state[p] = {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}
    return new_optimizer, source


@torch.no_grad()
def grow_in_place(model: nn.Module, optimizer: torch.optim.Optimizer, n_old: int, n_new: int, kind: str,
                  moments: str, new_layers: str = "copy") -> list[int]:
    """``grow`` for a model that holds all L layer slots from step 0 (``runtime/hf_trainer.py``): slots ``0..n_old-1``
    are live; afterwards slot ``j < n_new`` holds a copy of old slot ``source[j]`` (the same ``layer_map``),
    weights **and** AdamW state copied between existing parameters, so the optimizer, LR scheduler and a DDP
    wrapper built over all slots stay valid. The state policy is ``grow``'s: ``copy`` gives each new slot its
    source's state, ``reset`` empties every live slot's, ``fresh`` empties every parameter's (embeddings and
    head too), zeroed projections always start empty. A fresh layer (``new_layers="random"``) is the idle
    slot's own init, untouched since the model was built, with empty state. Returns the source map. Slots
    ``>= n_new`` are untouched."""
    if moments not in MOMENTS:
        raise ApolloError(f"unknown moments policy {moments!r} (choose from {', '.join(MOMENTS)})")
    if new_layers not in NEW_LAYERS:
        raise ApolloError(f"unknown new-layers policy {new_layers!r} (choose from {', '.join(NEW_LAYERS)})")
    slots = get_layers(model)
    if not 0 <= n_old < n_new <= len(slots):
        raise ApolloError(f"cannot grow {n_old} -> {n_new} live layers in a model with {len(slots)} slots")
    source = expansion_source(kind, n_old, n_new, new_layers)
    if any(i == FRESH and j < n_old for j, i in enumerate(source)):
        raise ApolloError(f"in-place growth {n_old} -> {n_new} would need a fresh layer in a trained slot; "
                          "--new-layers random grows in place only into idle slots")
    # A snapshot of the old live layers first: a slot can be both a copy's target and another copy's source.
    tensors = [{k: v.clone() for k, v in slots[i].state_dict().items()} for i in range(n_old)]
    states = [[{k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state.get(p, {}).items()}
               for p in slots[i].parameters()] for i in range(n_old)]
    for j, i in enumerate(source):
        if i == FRESH:  # an idle slot: its init weights stay, its (empty) state is cleared to be sure
            for p in slots[j].parameters():
                optimizer.state.pop(p, None)
            continue
        slots[j].load_state_dict(tensors[i])
        for p, state in zip(slots[j].parameters(), states[i], strict=True):
            optimizer.state.pop(p, None)
            if moments == "copy" and state:
                optimizer.state[p] = {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}
    if new_layers == "zeroed":
        for p in zeroed_params(model, nn.ModuleList(slots[:n_new]), source):
            p.zero_()
            optimizer.state.pop(p, None)
    if moments == "fresh":
        optimizer.state.clear()
    return source
