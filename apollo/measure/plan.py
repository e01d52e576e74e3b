"""``apollo plan``: the stage schedule a method will use for a budget and the FLOPs it will cost, without training.

It uses the training loop's own parts: ``table.resolve_method`` (the method's stages and switch points),
``train.total_steps`` (the run length), ``schedule.resolve_schedule`` (switch points in steps),
``sampling.depth_distribution`` (the analytic depth density of each stage) and ``flops.StepFlops`` (a step's
FLOPs at a depth). A step's expected FLOPs are ``sum_d P(d) * StepFlops.train(d, ...)`` per micro-batch; so the
plan equals the loop's count exactly for a method without depth sampling and in expectation with it. A masked LM's
head runs at the masked positions, about ``mlm_probability`` of the tokens (the loop counts the real ones).
bert2BERT and LiGO plan their full-depth run (LiGO's operator steps at one full-depth micro-batch each, the
operator's own small matrix products aside); the small model's training is counted separately, as in the reports.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config import ApolloError, MethodConfig, RunConfig, check
from ..method.sampling import depth_distribution
from ..method.schedule import resolve_schedule
from ..method.table import METHOD_TABLE, method_spec, resolve_method
from ..models import hf_config, is_masked, resolve_model
from ..runtime.train import grad_accum, total_steps
from .flops import StepFlops


@dataclass(frozen=True)
class Stage:
    live_layers: int
    first_step: int
    steps: int
    mean_depth: float  # expected executed depth per micro-batch
    flops: float


@dataclass(frozen=True)
class Plan:
    name: str
    method: MethodConfig
    steps: int
    tokens_per_step: int
    stages: tuple[Stage, ...]
    flops: float
    scratch_flops: float


def plan(cfg: RunConfig, world: int = 1) -> Plan:
    """The plan of ``cfg``'s method (its small model, for bert2BERT / LiGO, is not needed: only its name)."""
    check(cfg)
    m, t = resolve_model(cfg.model), cfg.train
    if not (t.steps or t.tokens):
        raise ApolloError("apollo plan needs the run length as --steps or --tokens (--epochs depends on the data)")
    method_cfg = cfg.method
    if method_spec(method_cfg.method).from_small and not method_cfg.small_model:
        method_cfg = dataclasses.replace(method_cfg, small_model="(small model)")
    method = resolve_method(method_cfg, m.layers)
    accum, steps = grad_accum(t, world), total_steps(t, m.seq_len, 1, world)
    schedule = resolve_schedule(method.stages, method.switch, method.switch_unit, steps, 1, m.layers)
    step_flops = StepFlops(hf_config(m))
    tokens = t.batch_size * world * m.seq_len  # one global micro-batch
    head = round(cfg.data.mlm_probability * tokens) if is_masked(m.arch) else tokens

    def micro(depth_p: dict[int, float]) -> float:
        return sum(p * step_flops.train(d, tokens, m.seq_len, head) for d, p in depth_p.items() if p)

    stages = []
    for i, n_live in enumerate(schedule.stages):
        first = schedule.starts[i]
        n = (schedule.starts[i + 1] if i + 1 < len(schedule.stages) else steps) - first
        dist = depth_distribution(method.sampler, n_live, m.layers) if n_live else {0: 1.0}
        stages.append(Stage(n_live, first, n, sum(d * p for d, p in dist.items()), n * accum * micro(dist)))
    operator = method.ligo_steps * step_flops.train(m.layers, tokens, m.seq_len, head)
    scratch = steps * accum * step_flops.train(m.layers, tokens, m.seq_len, head)
    return Plan(method.method, method, steps, tokens * accum, tuple(stages),
                sum(s.flops for s in stages) + operator, scratch)


def format_plan(p: Plan) -> str:
    """One method's stages, then its total against Scratch's at the same tokens."""
    m = p.method
    lines = [f"{p.name}: {p.steps:,} steps x {p.tokens_per_step:,} tokens = {p.steps * p.tokens_per_step:,} tokens; "
             f"sampler {m.sampler}, growth {m.growth}, new layers {m.new_layers}, moments {m.moments}"
             + (f", LR re-warmup over {m.rewarm:g} of the run after each growth" if m.rewarm else ""),
             "", "| stage | live layers | steps | tokens | mean depth | TFLOPs |", "|---|---|---|---|---|---|"]
    for i, s in enumerate(p.stages):
        lines.append(f"| {i} | {s.live_layers} | {s.first_step}-{s.first_step + s.steps - 1} | "
                     f"{s.steps * p.tokens_per_step:,} | {s.mean_depth:.2f} | {s.flops / 1e12:.3f} |")
    if m.ligo_steps:
        lines.append(f"| LiGO operator | - | {m.ligo_steps} steps before step 0 | | | "
                     f"{(p.flops - sum(s.flops for s in p.stages)) / 1e12:.3f} |")
    lines += ["", f"total {p.flops / 1e12:.3f} TFLOPs = {100 * p.flops / p.scratch_flops:.1f}% of Scratch's "
              f"{p.scratch_flops / 1e12:.3f} TFLOPs at the same tokens"
              + (" (the small model's training not counted)" if m.small_model else "")
              + ". The saving to Scratch's final loss is measured by training (apollo compare), not planned."]
    return "\n".join(lines)


def format_table(plans: list[Plan]) -> str:
    """Every method on one budget: stages, switch steps and the FLOPs against Scratch's."""
    lines = ["| method | stages (live layers) | switch steps | sampler | TFLOPs | % of Scratch |",
             "|---|---|---|---|---|---|"]
    for p in plans:
        switch = ", ".join(str(s.first_step) for s in p.stages[1:]) or "-"
        lines.append(f"| {p.name} | {' -> '.join(str(s.live_layers) for s in p.stages)} | {switch} | "
                     f"{p.method.sampler} | {p.flops / 1e12:.3f} | {100 * p.flops / p.scratch_flops:.1f}% |")
    first = plans[0]
    lines += ["", f"{first.steps:,} steps x {first.tokens_per_step:,} tokens. Totals at the same tokens "
              "(bert2bert / ligo: the small model's training not counted); the saving to Scratch's final loss is "
              "measured by training (apollo compare), not planned."]
    return "\n".join(lines)


def plan_all(cfg: RunConfig, world: int = 1) -> list[Plan]:
    return [plan(dataclasses.replace(cfg, method=MethodConfig(name)), world) for name in METHOD_TABLE]
