"""The fair protocol: every method gets the same learning-rate x schedule grid, seeds, data order and budget, is
reported at its own best setting (lowest final validation loss at seed 0; further seeds of that setting only report
it), and its FLOPs saving is measured against the best-tuned Scratch.

Screen (a cheap budget picks each method's candidates; the grid grows at an edge, the same rule for every method):

    python benchmarks/tune.py --data-dir PATH --tokens 500000 --methods scratch,apollo \\
        --lrs 5e-4,1e-3,2e-3,4e-3 --schedules cosine,wsd --out benchmarks/results/tune/gpt-h128-0.5M

Final (each method's ``--top`` best screen settings at the headline budget; ``--seeds 0,1,2`` for the headline):

    python benchmarks/tune.py --data-dir PATH --tokens 1500000 --methods scratch,apollo \\
        --from-screen benchmarks/results/tune/gpt-h128-0.5M --top 2 --out benchmarks/results/tune/gpt-h128-1.5M

Report only (merges what every process wrote into ``--out``): ``--report``. Several processes may share one
``--out`` with disjoint ``--methods`` (one core each). A finished run (summary.json, same config) is kept; an
interrupted one resumes from its latest checkpoint (``--checkpoint-every``), else restarts. Run folders are
``OUT/METHOD/lr{LR}-{SCHEDULE}-s{SEED}``; ``tune.md`` / ``tune.json`` hold the grid and the best rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from apollo.config import ApolloError, DataConfig, RunConfig, config_changes, load_yaml, preset, to_dict
from apollo.data import load_lm_data
from apollo.measure.report import first_reach, plot_loss_vs_flops, read_evals, read_summary
from apollo.method.table import FROM_SMALL, resolve_method
from apollo.runtime.checkpoint import saved
from apollo.runtime.train import train

sys.path.insert(0, str(Path(__file__).parent))
from wikitext import FILES, VARIANTS, sized  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Setting:
    method: str  # a wikitext.py variant name
    lr: float
    schedule: str
    seed: int

    @property
    def name(self) -> str:
        return f"lr{self.lr:g}-{self.schedule}-s{self.seed}"


def base_config(args: argparse.Namespace) -> RunConfig:
    cfg = preset(args.preset)
    m = sized(cfg, args.hidden)
    t = dataclasses.replace(cfg.train, tokens=args.tokens, eval_every=args.eval_every, eval_blocks=args.eval_blocks,
                            threads=args.threads, progress=False, checkpoint_every=args.checkpoint_every,
                            keep_checkpoints=1, **({"batch_size": args.batch_size} if args.batch_size else {}),
                            **({"warmup": args.warmup} if args.warmup is not None else {}),
                            **({"decay_fraction": args.decay_fraction} if args.decay_fraction is not None else {}))
    d = Path(args.data_dir)
    data = DataConfig(data=(str(d / FILES["train"]),), valid=(str(d / FILES["valid"]),),
                      **({"mlm_probability": args.mlm_probability} if args.mlm_probability is not None else {}))
    return dataclasses.replace(cfg, model=m, train=t, data=data, out="")


def run_config(base: RunConfig, s: Setting, out: Path, small_model: str) -> RunConfig:
    method = VARIANTS[s.method]
    if method.method in FROM_SMALL:
        method = dataclasses.replace(method, small_model=small_model)
    t = dataclasses.replace(base.train, lr=s.lr, lr_schedule=s.schedule, seed=s.seed)
    return dataclasses.replace(base, method=method, train=t, out=str(out / s.method / s.name))


def status(cfg: RunConfig) -> str:
    """done | resume | new: a finished run of exactly ``cfg``, a checkpointed one to continue, or neither."""
    run = Path(cfg.out)
    if not (run / "config.yaml").exists():
        return "new"
    resolved = dataclasses.replace(cfg, method=resolve_method(cfg.method, cfg.model.layers))
    if config_changes(load_yaml(run / "config.yaml"), resolved):
        return "new"
    if (run / "summary.json").exists():
        return "done"
    return "resume" if saved(run) else "new"


def final_loss(run: Path) -> float | None:
    summary = read_summary(run)
    return summary.get("final_val_loss") if summary else None


def extend_lrs(lrs: list[float], loss_at, extend: int) -> list[float]:
    """The LR grid, grown by x2 (or /2) while its best value (lowest ``loss_at(lr)``; None = not run yet) sits at
    the top (bottom) edge, up to ``extend`` values beyond each original edge."""
    lrs = sorted(lrs)
    low, high = lrs[0], lrs[-1]
    while True:
        losses = [loss_at(lr) for lr in lrs]
        if any(v is None for v in losses):
            return lrs  # extend only once the row is complete
        best = min(range(len(lrs)), key=lambda i: losses[i])
        if best == len(lrs) - 1 and sum(x > high for x in lrs) < extend:
            lrs.append(lrs[-1] * 2)
        elif best == 0 and sum(x < low for x in lrs) < extend:
            lrs.insert(0, lrs[0] / 2)
        else:
            return lrs


def grid(args: argparse.Namespace, out: Path, method: str) -> list[Setting]:
    """The settings of ``method`` to run now: the screen's ``--top`` best, or the LR grid x schedules extended at
    an edge by seed 0's results (the same rule for every method)."""
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.from_screen:
        ranked = ranked_settings(Path(args.from_screen), args.settings_of or method)
        return [Setting(method, lr, sched, seed) for lr, sched, _ in ranked[:args.top] for seed in seeds]
    settings = []
    for sched in args.schedules.split(","):
        lrs = extend_lrs([float(x) for x in args.lrs.split(",")],
                         lambda lr, sched=sched: final_loss(out / method / Setting(method, lr, sched, seeds[0]).name),
                         args.extend)
        settings += [Setting(method, lr, sched, seed) for lr in lrs for seed in seeds]
    return settings


def collect(out: Path) -> list[dict]:
    """Every finished run under ``out``: its setting, final validation loss, FLOPs, seconds and eval curve."""
    rows = []
    for summary_path in sorted(out.glob("*/*/summary.json")):
        run = summary_path.parent
        cfg = load_yaml(run / "config.yaml")
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        rows.append({"method": run.parent.name, "lr": cfg.train.lr, "schedule": cfg.train.lr_schedule,
                     "seed": cfg.train.seed, "final_val_loss": summary["final_val_loss"], "flops": summary["flops"],
                     "wall_s": summary["wall_s"], "run": run, "source_flops": source_flops(cfg)})
    return rows


def source_flops(cfg: RunConfig) -> float | None:
    """Training FLOPs of the small model that bert2BERT / LiGO grew from (None for the other methods). The papers
    leave it out of their savings; the report shows the saving both ways."""
    if not cfg.method.small_model:
        return None
    summary = read_summary(Path(cfg.method.small_model))
    if not summary:
        raise ApolloError(f"{cfg.method.small_model}: the small model's run has no summary.json")
    return summary["flops"]


def ranked_settings(out: Path, method: str) -> list[tuple[float, str, float]]:
    """(lr, schedule, mean final loss over seeds) of ``method`` in ``out``, best first. Seed 0 selects (every
    setting of a screen or a top-k run has it); further seeds only report the chosen setting, so adding them can
    never switch the choice. Settings without a seed 0 rank after, by their mean."""
    by: dict[tuple[float, str], dict[int, float]] = {}
    for r in collect(out):
        if r["method"] == method:
            by.setdefault((r["lr"], r["schedule"]), {})[r["seed"]] = r["final_val_loss"]
    if not by:
        raise ApolloError(f"{out} holds no finished {method} run")
    ranked = sorted(by.items(), key=lambda kv: (0 not in kv[1], kv[1].get(0, statistics.mean(kv[1].values()))))
    return [(lr, s, statistics.mean(v.values())) for (lr, s), v in ranked]


def saving(r: dict, target: dict) -> tuple[float | None, float | None, float | None]:
    """FLOPs saving, wall saving and FLOPs saving counting the small source model's training (bert2BERT, LiGO) of
    run ``r`` against Scratch run ``target``: ``1 - F_method / F_scratch`` at the first reach of its final loss."""
    reach = first_reach(read_evals(r["run"]), target["final_val_loss"])
    if not reach:
        return None, None, None
    with_source = None if r["source_flops"] is None else 1 - (reach[0] + r["source_flops"]) / target["flops"]
    return 1 - reach[0] / target["flops"], 1 - reach[1] / target["wall_s"], with_source


def pct(x: float | None) -> str:
    return "never" if x is None else f"{100 * x:.1f}%".replace("-0.0%", "0.0%")


def mean_std(xs: list[float | None]) -> str:
    if not xs or any(x is None for x in xs):
        return " / ".join(pct(x) for x in xs) or "n/a"
    if len(xs) == 1:
        return pct(xs[0])
    return f"{100 * statistics.mean(xs):.1f} ± {100 * statistics.stdev(xs):.1f}% (n={len(xs)})"


def report(out: Path, title: str) -> str:
    """tune.md / tune.json: the whole grid (method x LR x schedule, each seed) and each method at its best."""
    rows = collect(out)
    scratch = [r for r in rows if r["method"] == "scratch"]
    if not scratch:
        return "no finished Scratch run yet"
    best_scratch = ranked_settings(out, "scratch")[0]
    targets = {r["seed"]: r for r in scratch if (r["lr"], r["schedule"]) == best_scratch[:2]}
    for r in rows:
        t = targets.get(r["seed"])
        r["flops_saving"], r["wall_saving"], r["saving_with_source"] = saving(r, t) if t else (None, None, None)
        # The equal-tokens convention (zero/one-layer, G_stack papers): the whole run's FLOPs against Scratch's at the
        # same tokens, and how far the final loss lands from Scratch's (relative; negative = lower)
        r["equal_tokens_saving"] = 1 - r["flops"] / t["flops"] if t else None
        r["final_loss_gap"] = r["final_val_loss"] / t["final_val_loss"] - 1 if t else None
    methods = sorted({r["method"] for r in rows}, key=lambda m: (m != "scratch", m))  # Scratch first
    lines = [f"# {title}", "",
             f"Best Scratch: lr {best_scratch[0]:g}, {best_scratch[1]} (chosen by seed 0; mean final val loss "
             f"{best_scratch[2]:.4f}). Savings are FLOPs (and training seconds) to reach that run's final validation "
             "loss, same seed, against its total: `1 - F_method / F_scratch`. bert2BERT and LiGO grow a trained small "
             "model: their FLOPs saving leaves its training out (the papers' convention); the next column counts it. "
             "Equal-tokens saving and final-loss gap are the other convention (zero/one-layer, G_stack): the whole "
             "run's FLOPs against Scratch's at the same tokens, and its final loss relative to Scratch's "
             "(`L_method / L_scratch - 1`; negative = lower).",
             "", "## Each method at its best setting (lowest seed-0 final validation loss; mean over its seeds)", "",
             "| method | lr | schedule | seeds | final val loss | FLOPs saving | saving incl. small model "
             "| wall saving | equal-tokens saving | final-loss gap | settings tried |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    best_rows = []
    for m in methods:
        lr, sched, loss = ranked_settings(out, m)[0]
        mine = sorted((r for r in rows if r["method"] == m and (r["lr"], r["schedule"]) == (lr, sched)),
                      key=lambda r: r["seed"])
        tried = len({(r["lr"], r["schedule"]) for r in rows if r["method"] == m})
        losses = [r["final_val_loss"] for r in mine]
        loss_s = f"{loss:.4f}" + (f" ± {statistics.stdev(losses):.4f}" if len(losses) > 1 else "")
        with_source = mean_std([r["saving_with_source"] for r in mine]) if mine[0]["source_flops"] else "–"
        lines.append(f"| {m} | {lr:g} | {sched} | {','.join(str(r['seed']) for r in mine)} | {loss_s} | "
                     f"{mean_std([r['flops_saving'] for r in mine])} | {with_source} | "
                     f"{mean_std([r['wall_saving'] for r in mine])} | "
                     f"{mean_std([r['equal_tokens_saving'] for r in mine])} | "
                     f"{mean_std([r['final_loss_gap'] for r in mine])} | {tried} |")
        best_rows.append({"method": m, "lr": lr, "schedule": sched, "mean_final_val_loss": loss,
                          "seeds": [r["seed"] for r in mine], "flops_saving": [r["flops_saving"] for r in mine],
                          "saving_with_source": [r["saving_with_source"] for r in mine],
                          "source_flops": mine[0]["source_flops"], "wall_saving": [r["wall_saving"] for r in mine],
                          "equal_tokens_saving": [r["equal_tokens_saving"] for r in mine],
                          "final_loss_gap": [r["final_loss_gap"] for r in mine]})
    lrs = sorted({r["lr"] for r in rows})
    lines += ["", "## Final validation loss by learning rate (seed 0; * = the method's best)", "",
              "| method | schedule | " + " | ".join(f"{lr:g}" for lr in lrs) + " |", "|---|---|" + "---|" * len(lrs)]
    for m in methods:
        best = ranked_settings(out, m)[0][:2]
        for sched in sorted({r["schedule"] for r in rows if r["method"] == m}):
            cell = {r["lr"]: f"{r['final_val_loss']:.3f}" + ("*" if (r["lr"], sched) == best else "")
                    for r in rows if r["method"] == m and r["schedule"] == sched and r["seed"] == 0}
            lines.append(f"| {m} | {sched} | " + " | ".join(cell.get(lr, "–") for lr in lrs) + " |")
    lines += ["", "## The whole grid (final validation loss; FLOPs saving against the best Scratch)", "",
              "| method | lr | schedule | seed | final val loss | total TFLOPs | small model's TFLOPs | FLOPs saving "
              "| saving incl. small model |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (methods.index(r["method"]), r["schedule"], r["lr"], r["seed"])):
        src = r["source_flops"] is not None
        source = f"{r['source_flops'] / 1e12:.2f}" if src else "–"
        lines.append(f"| {r['method']} | {r['lr']:g} | {r['schedule']} | {r['seed']} | {r['final_val_loss']:.4f} | "
                     f"{r['flops'] / 1e12:.2f} | {source} | "
                     f"{pct(r['flops_saving'])} | {pct(r['saving_with_source']) if src else '–'} |")
    # The plot: each method's best setting at seed 0, the dashed line at the best Scratch's seed-0 final loss.
    best_runs = {b["method"]: out / b["method"] / f"lr{b['lr']}-{b['schedule']}-s0" for b in best_rows}
    target = targets[0]["final_val_loss"] if 0 in targets else None
    finals = [r["final_val_loss"] for r in rows if r["seed"] == 0 and r["run"] in best_runs.values()]
    ylim = (min(finals) - 0.05, target + 1.0) if target and finals else None  # the shallow stages' looped evals
    plot_loss_vs_flops({m: d for m, d in best_runs.items() if (d / "summary.json").exists()}, target,
                       out / "loss_vs_flops.png", f"{title}\neach method at its best setting, seed 0 "
                       "(bert2BERT / LiGO: small model not counted)", ylim)
    lines += ["", "![loss vs FLOPs](loss_vs_flops.png)"]
    text = "\n".join(lines) + "\n"
    (out / "tune.md").write_text(text, encoding="utf-8")
    grid_rows = [{k: (str(v) if k == "run" else v) for k, v in r.items()} for r in rows]
    (out / "tune.json").write_text(json.dumps({"best": best_rows, "grid": grid_rows}, indent=1), encoding="utf-8")
    return text


def report_title(out: Path) -> str:
    """--report keeps the title the training invocation wrote (it knew the preset and budget)."""
    md = out / "tune.md"
    first = md.read_text(encoding="utf-8").split("\n", 1)[0] if md.exists() else ""
    return first[2:] if first.startswith("# ") else out.name


def run_all(args: argparse.Namespace, base: RunConfig, out: Path) -> None:
    """Train every pending setting of every method; the grid is re-read after each run (edge extension)."""
    data = None
    for method in args.methods.split(","):
        while True:
            pending = [(s, st) for s in grid(args, out, method)
                       if (st := status(run_config(base, s, out, args.small_model))) != "done"]
            if not pending:
                break
            s, st = pending[0]
            cfg = run_config(base, s, out, args.small_model)
            print(f"[tune] {method} {s.name}: {'resuming' if st == 'resume' else 'training'}", flush=True)
            data = data or load_lm_data(base.data, base.model, 0)
            started = time.time()
            train(cfg, data, overwrite=True, resume=st == "resume")
            print(f"[tune] {method} {s.name}: val {final_loss(Path(cfg.out)):.4f} ({time.time() - started:.0f} s)",
                  flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt-tiny", choices=["bert-tiny", "gpt-tiny", "roberta-tiny", "llama-tiny"])
    ap.add_argument("--data-dir", help="directory with WikiText-2's " + ", ".join(FILES.values()))
    ap.add_argument("--tokens", type=int, default=500_000)
    ap.add_argument("--hidden", type=int, default=0, help="override the preset's width (ffn 4x, heads h/32)")
    ap.add_argument("--batch-size", type=int, default=0, help="override the preset's micro-batch")
    ap.add_argument("--warmup", type=float, default=None, help="override the preset's warmup fraction")
    ap.add_argument("--mlm-probability", type=float, default=None,
                    help="masked-LM masking rate (default 0.15; see benchmarks/results/bert-context)")
    ap.add_argument("--decay-fraction", type=float, default=None,
                    help="override WSD's decay fraction (0.2; zero/one-layer's paper decays over the last 10%%)")
    ap.add_argument("--methods", default="scratch,stackbert,apollo,apollo-plus",
                    help="comma list of wikitext.py variants: " + ", ".join(VARIANTS))
    ap.add_argument("--lrs", default="5e-4,1e-3,2e-3,4e-3", help="peak learning rates of the grid")
    ap.add_argument("--schedules", default="cosine,wsd")
    ap.add_argument("--extend", type=int, default=2, help="LRs added beyond each edge while the best sits there")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--from-screen", default="", help="run each method's --top best settings of this tune folder")
    ap.add_argument("--top", type=int, default=2)
    ap.add_argument("--settings-of", default="",
                    help="with --from-screen: take this method's best settings (a named fix run at the settings "
                         "chosen for the method it modifies)")
    ap.add_argument("--small-model", default="", help="trained smaller run for bert2bert / ligo")
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--eval-blocks", type=int, default=128)
    ap.add_argument("--checkpoint-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report", action="store_true", help="only write the report of what --out holds")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    try:
        unknown = [n for n in args.methods.split(",") if n not in VARIANTS]
        if unknown:
            raise ApolloError(f"unknown variant {unknown[0]!r} (choose from {', '.join(VARIANTS)})")
        if not args.report:
            if not args.data_dir or any(not (Path(args.data_dir) / f).is_file() for f in FILES.values()):
                raise ApolloError(f"--data-dir must hold {', '.join(FILES.values())}")
            base = base_config(args)
            out.mkdir(parents=True, exist_ok=True)
            started = time.time()
            run_all(args, base, out)
            meta = {"command": "python " + " ".join(sys.argv), "config": to_dict(base),
                    "wall_s_this_invocation": round(time.time() - started), "cpus": os.cpu_count(),
                    "machine": platform.processor() or platform.machine(), "torch": torch.__version__}
            (out / f"benchmark-{args.methods.replace(',', '+')}.json").write_text(json.dumps(meta, indent=1))
        print(report(out, f"{out.name}: {args.preset}, {args.tokens / 1e6:g}M tokens" if not args.report
                     else report_title(out)))
    except ApolloError as e:
        sys.exit(f"tune.py: error: {e}")


if __name__ == "__main__":
    main()
