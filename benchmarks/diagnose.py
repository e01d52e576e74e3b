"""Growth diagnostics for benchmark runs: what happens at each growth step, and how much of the final gap to
Scratch is already there when growth ends.

Reads the run directories of one or more benchmark folders (each with a ``scratch`` run) and writes
``diagnosis.md`` / ``diagnosis.json`` into ``--out``:

* per growth event: train loss (mean of the 5 steps before, the first step after, mean of the 5 after) and the
  total gradient norm (median of the 5 steps before, max of the 5 after; runs that predate grad-norm logging
  show n/a);
* per run: validation loss when the last growth is over (first evaluation at or after the last switch) against
  Scratch at the same step and at the same FLOPs, the final gap, and the share of the final gap (at equal
  steps) already present at that point.

    python benchmarks/diagnose.py benchmarks/results/plus-screen/gpt-h128-500000 --out benchmarks/results/plus-screen
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

from apollo.measure.report import read_events

WINDOW = 5


def read(run: Path) -> dict[str, list[dict]]:
    return {event: read_events(run, event) for event in ("step", "eval", "grow")}


def at(xs: list[float], ys: list[float], x: float) -> float:
    """``y`` at ``x`` on a curve, linear between points (NaN outside it)."""
    return float(np.interp(x, xs, ys, left=np.nan, right=np.nan))


def growth_rows(name: str, ev: dict[str, list[dict]]) -> list[dict]:
    steps = ev["step"]
    rows = []
    for g in ev["grow"]:
        s = g["step"]
        before, after = steps[max(0, s - WINDOW):s], steps[s:s + WINDOW]
        norms_b = [r["grad_norm"] for r in before if "grad_norm" in r]
        norms_a = [r["grad_norm"] for r in after if "grad_norm" in r]
        rows.append({"run": name, "step": s, "growth": f"{g['from']} -> {g['to']}",
                     "loss_before": statistics.fmean(r["loss"] for r in before),
                     "loss_first_after": after[0]["loss"], "loss_after": statistics.fmean(r["loss"] for r in after),
                     "grad_before": statistics.median(norms_b) if norms_b else None,
                     "grad_after_max": max(norms_a) if norms_a else None})
    return rows


def gap_row(name: str, ev: dict, scratch: dict) -> dict:
    sx = [e["step"] for e in scratch["eval"]]
    sf = [e["flops"] for e in scratch["eval"]]
    sv = [e["val_loss"] for e in scratch["eval"]]
    last = ev["grow"][-1]["step"] if ev["grow"] else 0
    end = next(e for e in ev["eval"] if e["step"] >= last)
    final = ev["eval"][-1]["val_loss"] - scratch["eval"][-1]["val_loss"]
    gap_steps = end["val_loss"] - at(sx, sv, end["step"])
    return {"run": name, "growth_ends": last, "eval_step": end["step"], "val": end["val_loss"],
            "gap_equal_steps": gap_steps, "gap_equal_flops": end["val_loss"] - at(sf, sv, end["flops"]),
            "final_gap": final, "share_at_growth_end": gap_steps / final if final > 0 else None}


def fmt(v, digits=3) -> str:
    return "n/a" if v is None or v != v else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", help="benchmark folders, each with a scratch run")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    growth, gaps = [], []
    for d in map(Path, args.dirs):
        if not (d / "scratch" / "metrics.jsonl").is_file():
            sys.exit(f"diagnose.py: error: {d} has no finished scratch run")
        scratch = read(d / "scratch")
        for run in sorted(p for p in d.iterdir() if (p / "summary.json").is_file() and p.name != "scratch"):
            ev = read(run)
            name = f"{d.name}/{run.name}"
            growth += growth_rows(name, ev)
            gaps.append(gap_row(name, ev, scratch))
    lines = ["# Growth diagnostics", "",
             f"Train loss around each growth (mean of {WINDOW} steps before / first step after / mean of {WINDOW} "
             f"after) and total gradient norm (median of {WINDOW} before / max of {WINDOW} after, before clipping).",
             "", "| run | step | growth | loss before | first after | after | grad before | grad after (max) |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['step']} | {r['growth']} | {fmt(r['loss_before'])} | {fmt(r['loss_first_after'])} "
              f"| {fmt(r['loss_after'])} | {fmt(r['grad_before'], 2)} | {fmt(r['grad_after_max'], 2)} |"
              for r in growth]
    lines += ["", "Validation loss at the first evaluation after the last growth, minus Scratch's at the same step "
              "and at the same FLOPs; final gap = final val loss minus Scratch's; share = gap at equal steps / "
              "final gap (n/a when the final gap is not positive).", "",
              "| run | last growth | eval step | val | gap, equal steps | gap, equal FLOPs | final gap | share |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['growth_ends']} | {r['eval_step']} | {fmt(r['val'])} | "
              f"{fmt(r['gap_equal_steps'])} | {fmt(r['gap_equal_flops'])} | {fmt(r['final_gap'])} | "
              f"{fmt(r['share_at_growth_end'], 2)} |" for r in gaps]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "diagnosis.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "diagnosis.json").write_text(json.dumps({"growth": growth, "gaps": gaps}, indent=1), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
