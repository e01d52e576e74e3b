"""When does progressive growth pay off? FLOPs saving against token budget and width, from wikitext.py runs.

Each argument is an output directory of ``benchmarks/wikitext.py`` (with at least ``scratch`` and one growth
method). The saving of a method is read from its ``results.csv`` (at Scratch's final validation loss); a run
that never reached it is plotted at its final loss gap instead, as a hollow marker, and listed as such.

    python benchmarks/sweep.py benchmarks/results/sweep/* --out benchmarks/results/sweep
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_point(run_dir: Path) -> list[dict]:
    """One record per method of a wikitext.py output directory."""
    meta = json.loads((run_dir / "benchmark.json").read_text())
    model, train = meta["config"]["model"], meta["config"]["train"]
    rows = list(csv.DictReader(open(run_dir / "results.csv", encoding="utf-8")))
    scratch = next(r for r in rows if r["method"] == "scratch")
    params = 12 * model["layers"] * model["hidden"] ** 2  # non-embedding parameters, ~12 h^2 per layer
    out = []
    for r in rows:
        saving = r["flops_saving"]
        out.append({"dir": run_dir.name, "method": r["method"], "hidden": model["hidden"], "tokens": train["tokens"],
                    "tokens_per_param": round(train["tokens"] / params, 2),
                    "flops_saving": float(saving) if saving not in ("", "None") else None,
                    "final_gap": float(r["final_val_loss"]) - float(scratch["final_val_loss"])})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    points = [p for d in args.dirs if (Path(d) / "results.csv").exists() for p in read_point(Path(d))]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(points, indent=1))
    methods = sorted({p["method"] for p in points} - {"scratch"})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "tokens", "training tokens (M)"), (axes[1], "hidden", "hidden size")):
        other = "hidden" if key == "tokens" else "tokens"
        for method in methods:
            for group in sorted({p[other] for p in points}):
                pts = sorted((p for p in points if p["method"] == method and p[other] == group), key=lambda p: p[key])
                if len({p[key] for p in pts}) < 2:
                    continue
                xs = [p[key] / 1e6 if key == "tokens" else p[key] for p in pts]
                ys = [100 * (p["flops_saving"] if p["flops_saving"] is not None else 0.0) for p in pts]
                line, = ax.plot(xs, ys, marker="o", label=f"{method} ({other} {group:g})")
                for x, y, p in zip(xs, ys, pts, strict=True):
                    if p["flops_saving"] is None:  # never reached Scratch's loss: drawn at 0, hollow
                        ax.plot([x], [y], marker="o", mfc="white", color=line.get_color())
        ax.axhline(0, color="gray", linewidth=1)
        ax.set_xlabel(label)
        ax.set_ylabel("FLOPs saving at Scratch's final loss (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_title("saving vs budget (hollow = never reached, shown as 0)", fontsize=9)
    axes[1].set_title("saving vs width", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "saving_vs_budget_width.png", dpi=120)
    lines = ["| run | hidden | tokens | tokens/param | method | FLOPs saving | final loss - Scratch's |",
             "|---|---|---|---|---|---|---|"]
    for p in sorted(points, key=lambda p: (p["hidden"], p["tokens"], p["method"])):
        if p["method"] == "scratch":
            continue
        saving = f"{100 * p['flops_saving']:.1f}%" if p["flops_saving"] is not None else "never reached"
        lines.append(f"| {p['dir']} | {p['hidden']} | {p['tokens'] / 1e6:g}M | {p['tokens_per_param']} | {p['method']} "
                     f"| {saving} | {p['final_gap']:+.3f} |")
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
