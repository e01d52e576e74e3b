"""Headline table over configurations and seeds: FLOPs saving, final gap and the worst gap at equal FLOPs.

Each argument is an output directory of ``benchmarks/wikitext.py`` holding a ``scratch`` run. Directories
with the same preset, width and budget but different seeds are grouped. Per method and configuration:

* FLOPs saving at Scratch's final validation loss, per seed (from ``results.csv``, the same run's Scratch);
* final validation loss minus Scratch's, per seed;
* worst gap at equal FLOPs: the largest ``val - scratch_val(at the same FLOPs)`` over the method's
  evaluations after the first 10% of Scratch's FLOPs (linear between Scratch's evaluations), per seed;
* saving against StackBERT: ``1 - F / F_stackbert``, with ``F`` the method's FLOPs when it first reaches
  StackBERT's final validation loss and ``F_stackbert`` StackBERT's total (meaningful where Scratch sits on a
  plateau, as bert-tiny does here);
* the seed-to-seed spread: Scratch's largest |seed 0 - seed 1| difference at equal FLOPs after 10%.

    python benchmarks/seeds.py benchmarks/results/plus/* --out benchmarks/results/plus
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from apollo.measure.report import first_reach, read_evals

SKIP = 0.10  # the first 10% of Scratch's FLOPs are excluded from the worst-gap check (issue 5)


def curve(run: Path) -> tuple[np.ndarray, np.ndarray]:
    evals = read_evals(run)
    return np.array([e["flops"] for e in evals], float), np.array([e["val_loss"] for e in evals], float)


def worst_gap(run: Path, scratch: Path) -> float:
    sf, sv = curve(scratch)
    f, v = curve(run)
    keep = (f >= SKIP * sf[-1]) & (f <= sf[-1])
    return float(np.max(v[keep] - np.interp(f[keep], sf, sv))) if keep.any() else float("nan")


def read_dir(d: Path) -> dict:
    meta = json.loads((d / "benchmark.json").read_text(encoding="utf-8"))
    model, train = meta["config"]["model"], meta["config"]["train"]
    rows = {r["method"]: r for r in csv.DictReader(open(d / "results.csv", encoding="utf-8"))}
    scratch_loss = float(rows["scratch"]["final_val_loss"])
    stack_loss, stack_flops = float(rows["stackbert"]["final_val_loss"]), float(rows["stackbert"]["total_flops"])
    methods = {}
    for name, r in rows.items():
        saving = r["flops_saving"]
        reach = first_reach(read_evals(d / name), stack_loss)
        methods[name] = {"saving": float(saving) if saving not in ("", "None") else None,
                         "final_gap": float(r["final_val_loss"]) - scratch_loss,
                         "worst_gap": worst_gap(d / name, d / "scratch"),
                         "vs_stackbert": 1 - reach[0] / stack_flops if reach else None}
    key = (model["arch"], model["hidden"], train["tokens"])
    return {"dir": d.name, "key": key, "seed": train["seed"], "methods": methods, "scratch": d / "scratch"}


def spread(scratch_runs: list[Path]) -> float | None:
    """Largest |difference| between two seeds' Scratch curves at equal FLOPs after the first 10%."""
    if len(scratch_runs) < 2:
        return None
    (af, av), (bf, bv) = curve(scratch_runs[0]), curve(scratch_runs[1])
    keep = (af >= SKIP * af[-1]) & (af <= bf[-1])
    return float(np.max(np.abs(av[keep] - np.interp(af[keep], bf, bv))))


def pct(x: float | None) -> str:
    return "never" if x is None else f"{100 * x:.1f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    # A point is a comparison folder (it has a StackBERT run); small-model-only folders are skipped.
    points = [read_dir(Path(d)) for d in args.dirs if (Path(d) / "stackbert" / "summary.json").is_file()]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for p in points:
        groups[p["key"]].append(p)
    lines = ["| model | hidden | tokens | seeds | Scratch spread | method | FLOPs saving (per seed) | "
             "final gap (per seed) | worst gap at equal FLOPs after 10% (per seed) | saving vs StackBERT (per seed) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    table = []
    for key in sorted(groups):
        runs = sorted(groups[key], key=lambda p: p["seed"])
        s = spread([p["scratch"] for p in runs])
        methods = [m for m in ("stackbert", "apollo", "apollo-plus", "bert2bert", "ligo")
                   if all(m in p["methods"] for p in runs)]
        for m in methods:
            per = [p["methods"][m] for p in runs]
            row = {"arch": key[0], "hidden": key[1], "tokens": key[2], "seeds": [p["seed"] for p in runs],
                   "scratch_spread": s, "method": m, "saving": [x["saving"] for x in per],
                   "final_gap": [x["final_gap"] for x in per], "worst_gap": [x["worst_gap"] for x in per],
                   "vs_stackbert": [x["vs_stackbert"] for x in per]}
            table.append(row)
            lines.append(f"| {key[0]} | {key[1]} | {key[2] / 1e6:g}M | {', '.join(map(str, row['seeds']))} | "
                         f"{'n/a' if s is None else f'{s:.3f}'} | {m} | {' / '.join(pct(x) for x in row['saving'])} | "
                         f"{' / '.join(f'{x:+.3f}' for x in row['final_gap'])} | "
                         f"{' / '.join(f'{x:+.3f}' for x in row['worst_gap'])} | "
                         f"{'(itself)' if m == 'stackbert' else ' / '.join(pct(x) for x in row['vs_stackbert'])} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "seeds.json").write_text(json.dumps(table, indent=1), encoding="utf-8")
    (out / "seeds.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
