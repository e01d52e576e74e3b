"""Gradient-norm spikes of growth runs, per stage, against Scratch's largest norm at the same setting.

Reads the step records (``grad_norm``, ``layer_grad_norm``, ``depth``, ``live_layers``) of every run in a
``tune.py`` folder (``OUT/METHOD/lr{LR}-{SCHEDULE}-s{SEED}``). For each run and stage: the largest total gradient
norm (before clipping), how many steps exceed 10x Scratch's largest norm at the same LR / schedule / seed (after
Scratch's first 10% of steps: its early transient is not a growth effect), and for the largest spike its step,
drawn depth, the live layer with the largest norm and the share of the total norm that the layers carry (the rest
is embeddings, final norm and head). Writes ``spikes.md`` / ``spikes.json`` and ``grad_norm.png`` (every method
at one setting).

    python benchmarks/spikes.py benchmarks/results/tune/gpt-h128-0.5M --plot-setting lr0.002-wsd-s0
    python benchmarks/spikes.py benchmarks/results/spikes --out benchmarks/results/spikes \
        --plot-runs benchmarks/results/demo/{scratch,stackbert,apollo,apollo-plus}
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from apollo.measure.report import read_events  # noqa: E402

FACTOR = 10  # the threshold: a spike is a norm above 10x Scratch's largest


def stage_stats(steps: list[dict], scratch_max: float) -> list[dict]:
    out = []
    for live in sorted({s["live_layers"] for s in steps}):
        mine = [s for s in steps if s["live_layers"] == live]
        top = max(mine, key=lambda s: s["grad_norm"])
        layers = top.get("layer_grad_norm") or []
        layer_share = math.sqrt(sum(x * x for x in layers)) / top["grad_norm"] if layers and top["grad_norm"] else None
        out.append({"live_layers": live, "steps": len(mine), "max_grad_norm": top["grad_norm"],
                    "above_10x_scratch": sum(s["grad_norm"] > FACTOR * scratch_max for s in mine),
                    "max_at_step": top["step"], "depth": top["depth"],
                    "top_layer": max(range(len(layers)), key=layers.__getitem__) if layers else None,
                    "layer_share": layer_share})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tune_dir")
    ap.add_argument("--plot-setting", default="", help="the run name whose curves grad_norm.png shows")
    ap.add_argument("--out", default="", help="default: the tune folder")
    ap.add_argument("--plot-runs", nargs="*", default=[], help="plot these run folders instead (e.g. the demo's)")
    args = ap.parse_args()
    root = Path(args.tune_dir)
    out = Path(args.out or root)
    runs = sorted(p.parent for p in root.glob("*/*/summary.json"))
    steps = {r: read_events(r, "step") for r in runs}
    scratch_max = {r.name: max(s["grad_norm"] for s in steps[r][len(steps[r]) // 10:]) for r in runs
                   if r.parent.name == "scratch"}
    table, lines = [], ["| method | setting | Scratch max | stage (live layers) | max grad norm | × Scratch max | "
                        f"steps > {FACTOR}× | spike step (depth) | top layer | layers' share of the norm |",
                        "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        if r.parent.name == "scratch" or r.name not in scratch_max:
            continue
        for st in stage_stats(steps[r], scratch_max[r.name]):
            table.append({"method": r.parent.name, "setting": r.name, "scratch_max": scratch_max[r.name], **st})
            share = "n/a" if st["layer_share"] is None else f"{100 * st['layer_share']:.0f}%"
            lines.append(f"| {r.parent.name} | {r.name} | {scratch_max[r.name]:.2f} | {st['live_layers']} | "
                         f"{st['max_grad_norm']:.2f} | {st['max_grad_norm'] / scratch_max[r.name]:.1f} | "
                         f"{st['above_10x_scratch']} | {st['max_at_step']} ({st['depth']}) | {st['top_layer']} | "
                         f"{share} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "spikes.json").write_text(json.dumps(table, indent=1), encoding="utf-8")
    (out / "spikes.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    if args.plot_setting or args.plot_runs:
        fig, ax = plt.subplots(figsize=(9, 4))
        chosen = ([(Path(d).name, read_events(Path(d), "step")) for d in args.plot_runs] if args.plot_runs else
                  [(r.parent.name, steps[r]) for r in runs if r.name == args.plot_setting])
        for label, records in chosen:
            ax.plot([s["step"] for s in records], [s["grad_norm"] for s in records], lw=0.8, label=label)
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("total gradient norm (before clipping)")
        ax.set_title(f"gradient norm, {args.plot_setting or ', '.join(args.plot_runs)}", fontsize=7)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "grad_norm.png", dpi=120)


if __name__ == "__main__":
    main()
