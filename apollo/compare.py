"""Run several methods on the same data, seed, token budget and LR schedule, then report the saving."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .baselines.bert2bert import load_small, small_dir, small_shape
from .config import ApolloError, MethodConfig, RunConfig, check, config_changes, load_yaml, save_yaml
from .data import load_lm_data
from .measure.report import report_dir
from .method.table import FROM_SMALL, METHODS, resolve_method
from .runtime import distributed
from .runtime.checkpoint import saved
from .runtime.train import prepare_run_dir, train


def stored_compare(out: Path) -> dict:
    """The methods and small-model shape an earlier ``apollo compare`` into ``out`` was started with."""
    try:
        return json.loads((out / "compare.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ApolloError(f"--resume {out}: not an apollo compare folder (no readable compare.json)") from None


def _run(cfg: RunConfig, data, resume: bool) -> None:
    """Train one method of a compare; on resume keep it if finished (same config), continue it from its
    checkpoint, or start it again."""
    run = Path(cfg.out)
    if resume and (run / "summary.json").exists():
        resolved = dataclasses.replace(cfg, method=resolve_method(cfg.method, cfg.model.layers))
        changes = config_changes(load_yaml(run / "config.yaml"), resolved)
        if changes:
            raise ApolloError(f"--resume: {run} finished with another config ({'; '.join(changes)})")
        return
    if resume and saved(run):
        train(cfg, data, resume=True)
    else:
        train(cfg, data, overwrite=resume)  # on resume: a method killed before its first checkpoint restarts


def checked(cfg: RunConfig, methods: list[str], small_hidden: int = 0,
            small_layers: int = 0) -> tuple[RunConfig | None, dict[str, MethodConfig]]:
    """Every check ``compare`` makes before it reads data: the config, the method names, each method's resolved
    config and a given ``--small-model``. Returns the config of the small model trained first (None when there is
    none to train) and each method's ``MethodConfig``, in order (``apollo compare --dry-run`` prints their plan)."""
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
    out = Path(cfg.out)
    grows = [n for n in methods if n in FROM_SMALL]
    small_cfg = None
    if grows and not m.small_model:
        small_cfg = dataclasses.replace(cfg, model=small_shape(cfg.model, small_hidden, small_layers),
                                        method=MethodConfig("scratch"), out=str(out / "small"))
        check(small_cfg)
    small = m.small_model or str(out / "small")

    def method_config(name: str) -> MethodConfig:
        if name not in FROM_SMALL:
            return MethodConfig(name, moments=m.moments)
        return MethodConfig(name, moments=m.moments, small_model=small, new_layers=m.new_layers,
                            width_init=m.width_init if name == "bert2bert" else "", ligo_steps=m.ligo_steps)

    configs = {name: method_config(name) for name in methods}
    for method in configs.values():
        resolve_method(method, cfg.model.layers)
    if m.small_model:
        load_small(m.small_model, cfg.model)  # a bad --small-model fails before anything is trained or written
    return small_cfg, configs


def compare(cfg: RunConfig, methods: list[str], overwrite: bool = False, small_hidden: int = 0,
            small_layers: int = 0, resume: bool = False) -> str:
    """Train each method into ``cfg.out/<method>``, then write the report (``report.report_dir``): results.md/.csv,
    loss_vs_flops.png, loss_vs_wall.png and depth_<method>.png for each method with more than one stage.

    bert2bert and ligo grow ``cfg.method.small_model``; without one, a Scratch run of the small shape
    (``bert2bert.small_shape``: half the width by default) is trained first into ``cfg.out/small`` on the same
    data and budget, and its FLOPs are reported separately, as the papers do.

    ``resume``: continue an interrupted compare in ``cfg.out`` (its own config and methods, ``compare.json``):
    finished methods are kept once their config checks out, the interrupted one resumes from its checkpoint (or
    restarts if it had none), the rest run; the report is the one an uninterrupted compare writes."""
    small_cfg, configs = checked(cfg, methods, small_hidden, small_layers)
    out = Path(cfg.out)
    m = cfg.method
    grows = [n for n in methods if n in FROM_SMALL]
    # Every method shares one tokenizer; a given small model brings its own (its embeddings are indexed by it).
    data_cfg = cfg.data
    if grows and m.small_model and not cfg.data.tokenizer:
        data_cfg = dataclasses.replace(cfg.data, tokenizer=small_dir(m.small_model))
    data = load_lm_data(data_cfg, cfg.model, cfg.train.seed)
    d = distributed.setup(cfg.train.device)  # under torchrun, rank 0 alone writes the shared folder and report
    if not resume:
        prepare_run_dir(out, overwrite, d)
        if d.main:
            save_yaml(cfg, out / "config.yaml")
            (out / "compare.json").write_text(json.dumps({"methods": methods, "small_hidden": small_hidden,
                                                          "small_layers": small_layers}), encoding="utf-8")
        distributed.barrier(d)
    if small_cfg is not None:
        _run(small_cfg, data, resume)
    runs = {}
    for name in methods:
        _run(dataclasses.replace(cfg, out=str(out / name), method=configs[name]), data, resume)
        runs[name] = out / name
    return report_dir(out, runs, f"{cfg.preset or cfg.model.arch}: {data.source}") if d.main else ""
