"""The methods table: every training method is one ``Method`` entry (stages, switch points, depth sampler, growth
map, new-layer init, AdamW-state policy, LR re-warmup, where the model starts) with its card beside it.

``resolve_method`` fills each empty ``MethodConfig`` field (what the user did not set) from the method's entry.
A new progressive method is one entry here (plus its growth map in ``growth.py`` if it needs a new one);
bert2BERT and LiGO start from a grown trained small model (``baselines/bert2bert.py``, ``baselines/ligo.py``)
and then train at full depth.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass

from ..baselines.bert2bert import WIDTH_INITS
from ..config import ApolloError, MethodConfig
from .growth import GROWTH, MOMENTS, NEW_LAYERS
from .sampling import SAMPLERS
from .schedule import check_stages

Stages = Callable[[int], tuple[tuple[int, ...], tuple[float, ...]]]  # depth L -> (live layers per stage, switch)


def fixed(stages: Callable[[int], list[int]], switch: tuple[float, ...]) -> Stages:
    """Stages from the depth, switch points as fractions of the run. At a small depth stages that coincide
    merge (``{L/4, L/2, L}`` at L = 2 is ``{1, 2}``) and the last switch points are kept."""
    def plan(depth: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
        s = tuple(sorted(set(stages(depth))))
        return s, switch[len(switch) - (len(s) - 1):] if len(s) > 1 else ()
    return plan


def prop_schedule(blocks: int, alpha: float = 1.0) -> tuple[float, ...]:
    """MIDAS's PROP-alpha stage lengths (Saunshi et al. 2024): stage ``i`` (1-based, ``blocks`` stages) trains
    for a time proportional to ``i ** alpha``; returns where stages 2..k start, as fractions of the run."""
    weights = [i ** alpha for i in range(1, blocks + 1)]
    total, starts, acc = sum(weights), [], 0.0
    for w in weights[:-1]:
        acc += w
        starts.append(round(acc / total, 6))
    return tuple(starts)


def midas_stages(depth: int, block: int = 0) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """MIDAS: blocks of ``b`` layers (default ``L / 6``: 6 stages, as 4-layer blocks of a 24-layer model): start
    with one block, add one duplicated middle block per stage, stage lengths PROP-1."""
    b = block or max(1, depth // 6)
    stages = tuple(sorted({*range(b, depth, b), depth}))
    return stages, prop_schedule(len(stages))


@dataclass(frozen=True)
class Method:
    """One method's defaults; every field but ``name`` and ``card`` is a ``MethodConfig`` default."""
    name: str
    card: str  # the idea and its source in two sentences (docs/methods/<name>.md says more)
    stages: Stages = fixed(lambda depth: [depth], ())
    sampler: str = "none"
    growth: str = "interpolation"
    new_layers: str = "copy"
    moments: str = "copy"
    rewarm: float = 0.0  # LR ramp after each growth, a fraction of the run
    from_small: bool = False  # starts from a grown trained smaller model (--small-model)
    width_init: str = ""
    ligo_steps: int = 0


def _quarter(depth: int) -> int:
    return max(1, depth // 4)


def _half(depth: int) -> int:
    return max(1, depth // 2)


METHOD_TABLE = types.MappingProxyType({m.name: m for m in (
    Method("scratch", "The full L-layer model from random init, every step at depth L.", sampler="fs"),
    Method("stackbert", "Gong et al. 2019: train L/4 layers, double by stacking (3 -> 6 -> 12) at 10% and 25% of the "
           "run, no depth sampling.", fixed(lambda L: [_quarter(L), _half(L), L], (0.10, 0.25)), growth="stacking"),
    Method("apollo", "Shi et al. 2024: 1 -> 3 -> 6 -> 12 live layers at 5/10/25%, each step at an LVPS-sampled depth "
           "sharing the live layers (Eq. 7-12), interpolation growth.",
           fixed(lambda L: [1, _quarter(L), _half(L), L], (0.05, 0.10, 0.25)), sampler="lvps"),
    Method("apollo-plus", "Ours: 3 -> 6 -> 12 at 20/40%, no depth sampling, interpolation growth whose repeat copies "
           "start with zeroed residual outputs (function-preserving on pre-LN).",
           fixed(lambda L: [_quarter(L), _half(L), L], (0.20, 0.40)), new_layers="zeroed"),
    Method("bert2bert", "Chen et al. 2022: widen a trained smaller model (AKI), deepen it by stacking, train on at "
           "full depth.", sampler="fs", growth="stacking", from_small=True, width_init="aki"),
    Method("ligo", "Wang et al. 2023: a learned linear growth operator from a trained smaller model, trained 100 "
           "steps, merged, then full-depth training.", sampler="fs", growth="stacking", from_small=True,
           width_init="fpi", ligo_steps=100),
    Method("zero-layer", "Bu 2025: embeddings and head only (no transformer layer) for 80% of the run, then one "
           "expansion to L freshly initialised layers (those Scratch starts from); LR unchanged at the expansion, "
           "meant for WSD with the decay in the last 10%.", fixed(lambda L: [0, L], (0.80,)), new_layers="random"),
    Method("one-layer", "Bu 2025: one layer for 80% of the run, then one expansion to L copies of it (weights and "
           "AdamW state); LR unchanged at the expansion, meant for WSD with the decay in the last 10%.",
           fixed(lambda L: [1, L], (0.80,))),
    # Du et al.'s rule log10(d) = 0.88 log10(N) + 163.27 / log10(C) - 5.74 asks for more tokens than our whole
    # run at CPU scale; at their headline setting (7B, 300B tokens) it gives d = 20B = 6.8% of the run: kept.
    Method("gstack", "Du et al. 2024 (G_stack): train L/4 layers, stack the whole model x4 once at 6.8% of the run "
           "(their growth-timing rule at their 7B / 300B setting), a fresh AdamW (every parameter) and an LR re-warmup "
           "over 2.5%.",
           fixed(lambda L: [_quarter(L), L], (0.068,)), growth="stacking", moments="fresh", rewarm=0.025),
    Method("midas", "Saunshi et al. 2024 (MIDAS): blocks of L/6 layers; start with one block and duplicate the "
           "middle block (ceil(n/2)) at each stage, stage lengths proportional to the stage index (PROP-1).",
           midas_stages, growth="middle"),
    # Ours (issue 18's candidate search: benchmarks/results/tune/ours-probe-gpt-*): the zero/one-layer paper's
    # schedule with apollo-plus's function-preserving growth instead of plain copies.
    Method("apollo-jump", "Ours: one layer for 80% of the run, then one interpolation jump to L whose 11 repeat copies "
           "start with zeroed residual outputs (function-preserving on pre-LN: the grown model computes what the "
           "one-layer model did); no depth sampling; meant for WSD with the decay in the last 10%.",
           fixed(lambda L: [1, L], (0.80,)), new_layers="zeroed"),
    # Ours for masked LMs (benchmarks/results/tune/ours-probe-bert-m40-3M-decay0.2): a masked LM learns its
    # context late, so a 1-layer phase is too shallow there; two late interpolation steps from L/6 layers instead.
    Method("apollo-twostep", "Ours: L/6 -> L/3 -> L live layers (2 -> 4 -> 12) at 50% and 80% of the run, "
           "interpolation growth whose repeat copies start with zeroed residual outputs (function-preserving on "
           "pre-LN); no depth sampling; meant for WSD.",
           fixed(lambda L: [max(1, L // 6), max(1, L // 3), L], (0.50, 0.80)), new_layers="zeroed"),
)})
METHODS = tuple(METHOD_TABLE)
FROM_SMALL = tuple(m.name for m in METHOD_TABLE.values() if m.from_small)  # --small-model methods


def method_spec(name: str) -> Method:
    if name not in METHOD_TABLE:
        raise ApolloError(f"unknown method {name!r} (choose from {', '.join(METHODS)})")
    return METHOD_TABLE[name]


def _check_fields(resolved: MethodConfig) -> None:
    for value, allowed, what in ((resolved.sampler, SAMPLERS, "sampler"), (resolved.growth, GROWTH, "growth"),
                                 (resolved.moments, MOMENTS, "moments policy"),
                                 (resolved.new_layers, NEW_LAYERS, "new-layers policy"),
                                 (resolved.width_init or "aki", WIDTH_INITS, "width init")):
        if value not in allowed:
            raise ApolloError(f"unknown {what} {value!r} (choose from {', '.join(allowed)})")


def resolve_method(m: MethodConfig, depth: int) -> MethodConfig:
    """Fill every empty field with the method's default (explicit fields win) and check the result."""
    spec = method_spec(m.method)
    stages, switch = spec.stages(depth)
    if m.switch_unit != "fraction" and not m.switch:
        raise ApolloError(f"--switch-unit {m.switch_unit} needs explicit --switch points")
    if m.stages and not m.switch and len(m.stages) != len(stages):
        raise ApolloError(f"custom stages {list(m.stages)} need --switch with {len(m.stages) - 1} points")
    resolved = MethodConfig(
        method=m.method,
        stages=m.stages or stages,
        switch=m.switch if (m.switch or m.stages) else switch,
        switch_unit=m.switch_unit,
        sampler=m.sampler or spec.sampler,
        growth=m.growth or spec.growth,
        moments=m.moments or spec.moments,
        new_layers=m.new_layers or spec.new_layers,
        rewarm=m.rewarm if m.rewarm >= 0 else spec.rewarm,
        small_model=m.small_model,
        width_init=m.width_init or spec.width_init,
        ligo_steps=m.ligo_steps or spec.ligo_steps,
    )
    if spec.from_small != bool(m.small_model):
        raise ApolloError(f"{m.method} needs --small-model RUN_DIR (a trained narrower run)" if spec.from_small
                          else f"--small-model is used only by {' and '.join(FROM_SMALL)}, not {m.method}")
    if spec.from_small and len(resolved.stages) != 1:
        raise ApolloError(f"{m.method} trains at full depth from its first step; it takes no --stages")
    if m.method == "ligo" and resolved.width_init != "fpi":
        raise ApolloError("ligo's operator starts from FPI; --width-init does not apply to it")
    if m.ligo_steps < 0:
        raise ApolloError(f"--ligo-steps must be >= 0, got {m.ligo_steps}")
    _check_fields(resolved)
    if resolved.rewarm >= 1:
        raise ApolloError(f"--rewarm must be a fraction of the run below 1, got {resolved.rewarm}")
    zero_start = len(resolved.stages) > 1 and resolved.stages[0] == 0
    if zero_start and (resolved.sampler, resolved.new_layers) != ("none", "random"):
        raise ApolloError("a zero-layer first stage needs --sampler none and --new-layers random (there is no layer "
                          "to share or copy)")
    check_stages(resolved.stages, resolved.switch, resolved.switch_unit, depth)
    return resolved
