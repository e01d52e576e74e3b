"""Scratch, StackBERT, Apollo (and apollo-plus) as choices of stages + depth sampler + growth operator; bert2BERT
and LiGO as a full-depth run that starts from a grown trained small model (``bert2bert.py``, ``ligo.py``).

A new progressive method is one entry here (plus its growth op in growth.py).
"""

from __future__ import annotations

import dataclasses

from .bert2bert import WIDTH_INITS
from .config import ApolloError, MethodConfig
from .growth import GROWTH, MOMENTS, NEW_LAYERS
from .sampling import SAMPLERS
from .schedule import check_stages

METHODS = ("scratch", "stackbert", "apollo", "apollo-plus", "bert2bert", "ligo")
FROM_SMALL = ("bert2bert", "ligo")  # methods that grow a trained smaller model (--small-model)


def _defaults(name: str, depth: int) -> MethodConfig:
    quarter, half = max(1, depth // 4), max(1, depth // 2)
    if name == "scratch":  # the full L-layer model, every step at depth L
        return MethodConfig("scratch", (depth,), (), "fraction", "fs", "interpolation", new_layers="copy", rewarm=0.0)
    if name == "stackbert":  # Gong et al. 2019: train N layers, double by stacking (3 -> 6 -> 12), no sampling
        stages = tuple(sorted({quarter, half, depth}))
        return MethodConfig("stackbert", stages, (0.10, 0.25)[-(len(stages) - 1):] if len(stages) > 1 else (),
                            "fraction", "none", "stacking", new_layers="copy", rewarm=0.0)
    if name == "apollo":  # the paper: 1 -> 3 -> 6 -> 12 at 5/10/25%, LVPS depths, interpolation growth
        stages = tuple(sorted({1, quarter, half, depth}))
        return MethodConfig("apollo", stages, (0.05, 0.10, 0.25)[-(len(stages) - 1):] if len(stages) > 1 else (),
                            "fraction", "lvps", "interpolation", new_layers="copy", rewarm=0.0)
    if name == "apollo-plus":  # beyond the paper (README method card): 3 -> 6 -> 12 at 20/40%, no depth sampling,
        # interpolation growth whose repeat copies start with zeroed residual outputs (function-preserving)
        stages = tuple(sorted({quarter, half, depth}))
        return MethodConfig("apollo-plus", stages, (0.20, 0.40)[-(len(stages) - 1):] if len(stages) > 1 else (),
                            "fraction", "none", "interpolation", new_layers="zeroed", rewarm=0.0)
    if name in FROM_SMALL:  # bert2BERT / LiGO: every step at full depth; depth growth from the small model stacks
        return MethodConfig(name, (depth,), (), "fraction", "fs", "stacking", new_layers="copy", rewarm=0.0,
                            width_init="aki" if name == "bert2bert" else "fpi", ligo_steps=100 if name == "ligo" else 0)
    raise ApolloError(f"unknown method {name!r} (choose from {', '.join(METHODS)})")


def resolve_method(m: MethodConfig, depth: int) -> MethodConfig:
    """Fill every empty field with the method's default (explicit fields win) and check the result."""
    base = _defaults(m.method, depth)
    if m.switch_unit != "fraction" and not m.switch:
        raise ApolloError(f"--switch-unit {m.switch_unit} needs explicit --switch points")
    if m.stages and not m.switch and len(m.stages) != len(base.stages):
        raise ApolloError(f"custom stages {list(m.stages)} need --switch with {len(m.stages) - 1} points")
    resolved = dataclasses.replace(
        base,
        stages=m.stages or base.stages,
        switch=m.switch if (m.switch or m.stages) else base.switch,
        switch_unit=m.switch_unit,
        sampler=m.sampler or base.sampler,
        growth=m.growth or base.growth,
        moments=m.moments,
        new_layers=m.new_layers or base.new_layers,
        rewarm=m.rewarm if m.rewarm >= 0 else base.rewarm,
        small_model=m.small_model,
        width_init=m.width_init or base.width_init,
        ligo_steps=m.ligo_steps or base.ligo_steps,
    )
    if (m.method in FROM_SMALL) != bool(m.small_model):
        raise ApolloError(f"{m.method} needs --small-model RUN_DIR (a trained narrower run)" if m.method in FROM_SMALL
                          else f"--small-model is used only by {' and '.join(FROM_SMALL)}, not {m.method}")
    if m.method in FROM_SMALL and len(resolved.stages) != 1:
        raise ApolloError(f"{m.method} trains at full depth from its first step; it takes no --stages")
    if m.method == "ligo" and resolved.width_init != "fpi":
        raise ApolloError("ligo's operator starts from FPI; --width-init does not apply to it")
    if m.ligo_steps < 0:
        raise ApolloError(f"--ligo-steps must be >= 0, got {m.ligo_steps}")
    for value, allowed, what in ((resolved.sampler, SAMPLERS, "sampler"), (resolved.growth, GROWTH, "growth"),
                                 (resolved.moments, MOMENTS, "moments policy"),
                                 (resolved.new_layers, NEW_LAYERS, "new-layers policy"),
                                 (resolved.width_init or "aki", WIDTH_INITS, "width init")):
        if value not in allowed:
            raise ApolloError(f"unknown {what} {value!r} (choose from {', '.join(allowed)})")
    if resolved.rewarm >= 1:
        raise ApolloError(f"--rewarm must be a fraction of the run below 1, got {resolved.rewarm}")
    check_stages(resolved.stages, resolved.switch, resolved.switch_unit, depth)
    return resolved
