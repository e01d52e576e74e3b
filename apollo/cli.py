"""The ``apollo`` command: ``train``, ``compare``, ``plan``, ``finetune`` and ``evaluate``.

Bad input becomes one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from pathlib import Path

from .config import (
    PRESET_NAMES,
    SECTIONS,
    ApolloError,
    RunConfig,
    check,
    from_dict,
    load_yaml,
    preset,
    section_fields,
    to_dict,
)
from .runtime.checkpoint import latest


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # one line, no usage dump
        self.exit(2, f"apollo: error: {message}\n")


def _add_config_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per config field (``--hidden``, ``--stages 1,3,6,12``, ``--data a.txt b.txt`` ...)."""
    parser.add_argument("--preset", help=f"one of: {', '.join(PRESET_NAMES)}")
    parser.add_argument("--config", help="a YAML config (e.g. a run's config.yaml); flags override it")
    parser.add_argument("--out", help="run directory")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    for section in SECTIONS:
        group = parser.add_argument_group(section)
        hints = section_fields(section)
        for f in dataclasses.fields(typing.get_type_hints(RunConfig)[section]):
            if f.name in skip:
                continue
            tp = hints[f.name]
            kw = {"dest": f"{section}.{f.name}", "default": None, "help": f.metadata.get("help")}
            flag = "--" + f.name.replace("_", "-")
            if tp is bool:
                group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            elif typing.get_origin(tp) is tuple:  # "extend" fields add up when repeated (--report-to a --report-to b)
                group.add_argument(flag, nargs="+", metavar="V", action="extend" if f.metadata.get("extend") else None,
                                   **kw)
            else:
                group.add_argument(flag, metavar=tp.__name__.upper(), **kw)


_DRY_RUN = ("resolve the config and make every check a run makes before it reads data, print the resolved config "
            "and the stage plan, and exit: nothing is trained, read or written")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="apollo", description="Progressive depth training (Apollo, AAAI 2024) on HF models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = sub.add_parser("train", help="train one run of one method (--method)")
    _add_config_flags(train)
    train.add_argument("--resume", metavar="RUN_DIR",
                       help="continue RUN_DIR from its latest checkpoint (its config; flags may change only "
                            "--threads, --progress, --checkpoint-every, --keep-checkpoints, --skip-nonfinite, "
                            "--report-to, --energy, --country-iso-code, --energy-tracking-mode)")
    train.add_argument("--allow-config-change", action="store_true",
                       help="with --resume: accept flags that change the result, and list them")
    train.add_argument("--dry-run", action="store_true", help=_DRY_RUN)
    compare = sub.add_parser("compare", help="train several methods on the same budget and report the saving")
    compare.add_argument("--methods", default="scratch,stackbert,apollo", help="comma-separated method names")
    compare.add_argument("--small-hidden", type=int, default=0,
                         help="bert2bert/ligo without --small-model: width of the small model trained first "
                              "(default: half the target's)")
    compare.add_argument("--small-layers", type=int, default=0,
                         help="... and its depth (default: the target's)")
    compare.add_argument("--resume", metavar="OUT",
                         help="continue an interrupted compare in OUT: finished methods are kept, the interrupted one "
                              "resumes from its checkpoint, the rest run (its own config and methods)")
    compare.add_argument("--dry-run", action="store_true", help=_DRY_RUN)
    _add_config_flags(compare, skip=("method",))
    plan = sub.add_parser("plan", help="print a method's stage schedule and expected FLOPs for a budget, without "
                                       "training (no --method: every method)")
    _add_config_flags(plan)
    finetune = sub.add_parser("finetune", help="fine-tune a run's model on a GLUE task or SQuAD and report the metric")
    finetune.add_argument("--model", required=True, help="a run directory (or a saved HF model directory)")
    finetune.add_argument("--task", required=True, help="sst2 | mrpc | rte | stsb | wnli | cola | qnli | mnli | qqp "
                                                        "| squad | squad_v2")
    finetune.add_argument("--seed", type=int, default=0)
    finetune.add_argument("--out", help="where to write result.json (default: RUN/finetune/TASK-sSEED)")
    _add_finetune_flags(finetune)
    evaluate = sub.add_parser("evaluate", help="fine-tune several runs on several tasks and seeds: a Table-4 table")
    evaluate.add_argument("--runs", nargs="+", required=True, metavar="RUN_DIR")
    evaluate.add_argument("--tasks", default="sst2,mrpc,rte,stsb",
                          help="comma-separated tasks; blimp: zero-shot BLiMP accuracy (no fine-tuning)")
    evaluate.add_argument("--seeds", default="0,1,2", help="comma-separated fine-tuning seeds")
    evaluate.add_argument("--lm-test", nargs="+", default=(), metavar="FILE",
                          help="also report each run's LM perplexity on these text files")
    evaluate.add_argument("--out", default="runs/evaluate", help="results directory (finished fine-tunes are kept)")
    evaluate.add_argument("--blimp-dir", default="", metavar="DIR",
                          help="blimp: BLiMP's folder of paradigm NAME.jsonl files (with models_summary.reference"
                               ".jsonl beside them for the authors' figures), or 'hub' to download it with datasets")
    evaluate.add_argument("--max-pairs", type=int, default=0, metavar="N",
                          help="blimp: a fixed seeded sample of N pairs per paradigm (0 = all)")
    _add_finetune_flags(evaluate)
    return parser


def _add_finetune_flags(parser: argparse.ArgumentParser) -> None:
    from .evaluation.finetune import FinetuneConfig

    for f in dataclasses.fields(FinetuneConfig):
        if f.name not in ("task", "seed"):
            parser.add_argument("--" + f.name.replace("_", "-"), dest=f"ft.{f.name}", type=type(f.default),
                                default=f.default, metavar=type(f.default).__name__.upper())


def _finetune_config(args: argparse.Namespace, task: str, seed: int):
    from .evaluation.finetune import FinetuneConfig

    return FinetuneConfig(task=task, seed=seed,
                          **{k.split(".")[1]: v for k, v in vars(args).items() if k.startswith("ft.")})


def _downstream(args: argparse.Namespace) -> None:
    from .evaluation.finetune import evaluate_runs, finetune

    if args.command == "finetune":
        out = Path(args.out) if args.out else Path(args.model) / "finetune" / f"{args.task}-s{args.seed}"
        r = finetune(Path(args.model), _finetune_config(args, args.task, args.seed), out)
        metrics = ", ".join(f"{k} {v:.2f}" for k, v in r["test"].items())
        print(f"{args.task}: test {metrics} (best dev epoch {r['best_epoch']}; {r['splits']}); wrote {out}/result.json")
        return
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise ApolloError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if (args.blimp_dir or args.max_pairs) and "blimp" not in tasks:
        raise ApolloError("--blimp-dir and --max-pairs apply only with blimp in --tasks")
    out = Path(args.out)
    table = evaluate_runs([Path(r) for r in args.runs], tasks, seeds, _finetune_config(args, "", 0), out,
                          list(args.lm_test), blimp_dir=args.blimp_dir, max_pairs=args.max_pairs)
    print(table + f"\nwrote {out}/results.md, results.csv" + (", blimp.md, blimp.csv" if "blimp" in tasks else ""))


def resolve_config(args: argparse.Namespace) -> RunConfig:
    """preset -> --config YAML -> individual flags, later ones winning; with --resume, the run's own config."""
    resume = getattr(args, "resume", None)
    if resume:
        if args.preset or args.config:
            raise ApolloError("--resume uses the run's own config; pass only the flags to change, not "
                              "--preset or --config")
        if args.overwrite:
            raise ApolloError("--resume continues a run and --overwrite replaces it: choose one")
        if args.out and Path(args.out).resolve() != Path(resume).resolve():
            raise ApolloError(f"--resume {resume} writes into that run; --out {args.out} names another")
        if args.command == "train":
            latest(Path(resume))  # a missing run or checkpoint is reported before its config is checked
        elif not (Path(resume) / "config.yaml").exists():
            raise ApolloError(f"--resume {resume}: not an apollo compare folder (no config.yaml)")
        args.out = resume
    if getattr(args, "allow_config_change", False) and not resume:
        raise ApolloError("--allow-config-change applies only with --resume")
    cfg = preset(args.preset) if args.preset else RunConfig()
    if resume:
        cfg = load_yaml(Path(resume) / "config.yaml")
    elif args.config:
        base = load_yaml(args.config)
        cfg = from_dict({k: v for k, v in to_dict(base).items() if k != "preset"}, cfg) if args.preset else base
    changes: dict[str, dict] = {}
    for dest, value in vars(args).items():
        if "." in dest and value is not None:
            section, name = dest.split(".")
            changes.setdefault(section, {})[name] = value
    if changes.get("model", {}).get("model_config") and not (args.preset or args.config or resume):
        from .models import load_hf_config, sizes_of  # the architecture's own depth and width, unless flags say

        sizes = sizes_of(load_hf_config(changes["model"]["model_config"]))
        changes["model"] = {**sizes, **changes["model"]}
    cfg = from_dict(changes, cfg)
    if cfg.model.model_config:
        from .models import resolve_model

        cfg = dataclasses.replace(cfg, model=resolve_model(cfg.model))
    if args.out:
        cfg = from_dict({"out": args.out}, cfg)
    elif args.command == "compare":
        cfg = from_dict({"out": f"runs/compare-{cfg.preset or cfg.model.arch}"}, cfg)
    else:
        cfg = from_dict({"out": f"runs/{cfg.preset or cfg.model.arch}-{cfg.method.method}"}, cfg)
    return cfg


def _check_data_files(cfg: RunConfig) -> None:
    """Local data files exist and are files (not read: that is the run's data loading)."""
    if cfg.data.dataset:  # --data / --valid are then the loader's data_files (patterns are allowed)
        return
    for path in (*cfg.data.data, *cfg.data.valid, *cfg.data.test):
        p = Path(path)
        if not p.exists():
            raise ApolloError(f"data file not found: {path}")
        if p.is_dir():
            raise ApolloError(f"data file is a directory: {path}")


def _yaml(cfg: RunConfig) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip()


def _compare_methods(args: argparse.Namespace) -> tuple[list[str], tuple[int, int]]:
    """compare's methods and small-model shape: from the flags, or from the stored comparison when resuming."""
    from .compare import stored_compare

    if args.resume:
        stored = stored_compare(Path(args.resume))
        return stored["methods"], (stored["small_hidden"], stored["small_layers"])
    return [m.strip() for m in args.methods.split(",") if m.strip()], (args.small_hidden, args.small_layers)


def _dry_run(args: argparse.Namespace, cfg: RunConfig) -> str:
    """``train`` / ``compare`` with ``--dry-run``: the checks a run makes before it reads data (config, method,
    device, memory, run directory, resume point, small model), plus that the local data files exist; returns the
    resolved config and the stage plan. Nothing is trained, read (but a --small-model or --resume checkpoint) or
    written; no process group is joined."""
    from .measure.plan import format_plan, format_table, plan
    from .method.table import resolve_method
    from .models import resolve_model
    from .runtime.distributed import resolve_device
    from .runtime.memory import check_fits
    from .runtime.train import check_run_dir, grad_accum

    world = int(os.environ.get("WORLD_SIZE", "1"))
    check(cfg)
    cfg = dataclasses.replace(cfg, model=resolve_model(cfg.model))
    t = cfg.train
    if args.command == "train":
        method = resolve_method(cfg.method, cfg.model.layers)
        small_cfg, configs = None, {method.method: cfg.method}
    else:
        from .compare import checked

        methods, small = _compare_methods(args)
        small_cfg, configs = checked(cfg, methods, *small)
    check_fits(cfg.model, t, resolve_device(t.device, int(os.environ.get("LOCAL_RANK", "0"))))
    grad_accum(t, world)
    if args.resume:  # the run folder exists; train checks its latest checkpoint against the config
        if args.command == "train":
            from .runtime.train import _resume_point

            _resume_point(dataclasses.replace(cfg, method=method), args.allow_config_change)
    else:
        check_run_dir(Path(cfg.out), args.overwrite)
        if args.command == "train" and method.small_model:
            from .baselines.bert2bert import load_small

            load_small(method.small_model, cfg.model)
    _check_data_files(cfg)
    shown = dataclasses.replace(cfg, method=method) if args.command == "train" else cfg
    where = cfg.out if args.command == "train" else f"{cfg.out} (compare), {cfg.out}/<method> (each run)"
    lines = [f"# apollo {args.command} --dry-run: checked; nothing trained, read or written",
             f"# the resolved config, as {Path(cfg.out) / 'config.yaml'} will hold it; runs into {where}",
             _yaml(shown), ""]
    if not (t.steps or t.tokens):
        lines.append("stage plan: the run length is in --epochs, so its steps depend on the data (not read here)")
        return "\n".join(lines)
    plans = [plan(dataclasses.replace(cfg, method=c), world) for c in configs.values()]
    lines.append(format_plan(plans[0]) if args.command == "train" else format_table(plans))
    if small_cfg is not None:
        s = plan(small_cfg, world)
        lines += ["", f"small model for bert2bert / ligo, trained first into {small_cfg.out} (scratch, hidden "
                  f"{small_cfg.model.hidden}, {small_cfg.model.layers} layers): {s.flops / 1e12:.3f} TFLOPs = "
                  f"{100 * s.flops / plans[0].scratch_flops:.1f}% of the target's Scratch"]
    return "\n".join(lines)


def _error(message: str, prefix: str = "apollo: error") -> None:
    rank = int(os.environ.get("RANK", "0"))  # under torchrun every rank reports, so a failure on one is not hidden
    print(f"{prefix}{f' (rank {rank})' if rank else ''}: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # transformers' own bars (loading and writing weights) would break the one-line error and the run's own bar
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        if args.command in ("finetune", "evaluate"):
            _downstream(args)
            return 0
        cfg = resolve_config(args)
        if getattr(args, "dry_run", False):
            print(_dry_run(args, cfg))
        elif args.command == "plan":
            from .measure.plan import format_plan, format_table, plan, plan_all

            print(format_plan(plan(cfg)) if getattr(args, "method.method") else format_table(plan_all(cfg)))
        elif args.command == "train":
            from .runtime.distributed import is_main_process
            from .runtime.train import train

            s = train(cfg, overwrite=args.overwrite, resume=bool(args.resume),
                      allow_config_change=args.allow_config_change)
            if is_main_process():
                print(f"{s['method']}: final val loss {s['final_val_loss']:.4f}, {s['flops'] / 1e12:.2f} TFLOPs, "
                      f"{s['wall_s']:.0f} s training; data: {s['data']}; run: {cfg.out}")
        else:
            from .compare import compare

            methods, small = _compare_methods(args)
            table = compare(cfg, methods, args.overwrite, *small, resume=bool(args.resume))
            if table:  # rank 0 (or the only process)
                print(table + f"\nwrote {cfg.out}/results.md, results.csv, loss_vs_flops.png")
    except ApolloError as e:
        _error(str(e), "apollo" if hasattr(e, "exit_code") else "apollo: error")
        return getattr(e, "exit_code", 2)
    except OSError as e:
        _error(f"{e.strerror or e} ({e.filename or ''})")
        return 2
    except KeyboardInterrupt:
        _error("interrupted", "apollo")
        return 130
    finally:
        from .runtime.distributed import shutdown

        shutdown()
    return 0
