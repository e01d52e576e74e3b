"""Run several methods on the same data, seed, token budget and LR schedule, then report the saving."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .config import ApolloError, MethodConfig, RunConfig, check, save_yaml
from .data import load_lm_data
from .methods import METHODS, resolve_method
from .report import report_dir
from .train import prepare_run_dir, train


def compare(cfg: RunConfig, methods: list[str], overwrite: bool = False) -> str:
    """Train each method into ``cfg.out/<method>``, then write the report (``report.report_dir``): results.md/.csv,
    loss_vs_flops.png, loss_vs_wall.png and depth_<method>.png for each method with more than one stage."""
    check(cfg)
    if not methods:
        raise ApolloError(f"--methods is empty (choose from {', '.join(METHODS)})")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ApolloError(f"unknown method {unknown[0]!r} (choose from {', '.join(METHODS)})")
    if len(set(methods)) != len(methods):
        raise ApolloError(f"--methods lists a method twice: {','.join(methods)}")
    m = cfg.method
    if m.stages or m.switch or m.sampler or m.growth:
        raise ApolloError("compare runs each method with its defaults; set --stages/--switch/--sampler/--growth "
                          "with apollo train")
    for name in methods:
        resolve_method(MethodConfig(name, moments=m.moments), cfg.model.layers)
    out = Path(cfg.out)
    data = load_lm_data(cfg.data, cfg.model, cfg.train.seed)
    prepare_run_dir(out, overwrite)
    save_yaml(cfg, out / "config.yaml")
    runs = {}
    for name in methods:
        run_cfg = dataclasses.replace(cfg, out=str(out / name), method=MethodConfig(name, moments=m.moments))
        train(run_cfg, data)
        runs[name] = out / name
    return report_dir(out, runs, f"{cfg.preset or cfg.model.arch}: {data.source}")
