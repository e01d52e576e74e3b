"""The metric (spec, "The metric"): saving at Scratch's final validation loss, tables and the Fig. 6 plot.

FLOPs saving = ``1 - F_method / F_scratch``: ``F_scratch`` is Scratch's total training FLOPs at the end of
its run, ``F_method`` the method's cumulative FLOPs when its validation loss first reaches Scratch's final
validation loss. Wall-clock saving is the same with training seconds (evaluation time excluded). Between
two evaluations the curve is taken as linear, so the crossing is interpolated. This is a *saving*, not a
"speedup" (``F_s / F_m - 1``).
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


@dataclass
class Row:
    method: str
    final_val_loss: float
    total_flops: float
    wall_s: float
    flops_to_target: float | None  # None: never reached Scratch's final loss
    wall_s_to_target: float | None
    flops_saving: float | None
    wall_saving: float | None


def read_evals(run_dir: Path) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == "eval"]


def first_reach(evals: list[dict], target: float) -> tuple[float, float] | None:
    """(FLOPs, wall seconds) at which the validation curve first reaches ``target`` (linear between evals)."""
    prev = None
    for e in evals:
        if e["val_loss"] <= target:
            if prev is None or prev["val_loss"] == e["val_loss"]:
                return e["flops"], e["wall_s"]
            f = (prev["val_loss"] - target) / (prev["val_loss"] - e["val_loss"])
            return (prev["flops"] + f * (e["flops"] - prev["flops"]),
                    prev["wall_s"] + f * (e["wall_s"] - prev["wall_s"]))
        prev = e
    return None


def summarize(runs: dict[str, Path]) -> tuple[list[Row], float | None]:
    """One row per run; savings are relative to the run named ``scratch`` (None without one)."""
    evals = {name: read_evals(d) for name, d in runs.items()}
    scratch = evals.get("scratch")
    target = scratch[-1]["val_loss"] if scratch else None
    rows = []
    for name, ev in evals.items():
        last = ev[-1]
        reach = first_reach(ev, target) if target is not None else None
        rows.append(Row(name, last["val_loss"], last["flops"], last["wall_s"],
                        reach[0] if reach else None, reach[1] if reach else None,
                        1 - reach[0] / scratch[-1]["flops"] if reach else None,
                        1 - reach[1] / scratch[-1]["wall_s"] if reach else None))
    return rows, target


def _fmt(x: float | None, kind: str) -> str:
    if x is None:
        return "never reached"
    return {"loss": f"{x:.4f}", "tflops": f"{x / 1e12:.2f}", "s": f"{x:.0f}", "pct": f"{100 * x:.1f}%"}[kind]


def write_results(rows: list[Row], target: float | None, out: Path, source: str) -> str:
    """Write results.csv and results.md; return the Markdown table."""
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    head = ("| method | final val loss | total TFLOPs | train s | TFLOPs to target | s to target "
            "| FLOPs saving | wall saving |\n|---|---|---|---|---|---|---|---|\n")
    table = head + "".join(
        f"| {r.method} | {_fmt(r.final_val_loss, 'loss')} | {_fmt(r.total_flops, 'tflops')} | {_fmt(r.wall_s, 's')} "
        f"| {_fmt(r.flops_to_target, 'tflops')} | {_fmt(r.wall_s_to_target, 's')} | {_fmt(r.flops_saving, 'pct')} "
        f"| {_fmt(r.wall_saving, 'pct')} |\n" for r in rows)
    target_line = f"{target:.4f}" if target is not None else "n/a (no scratch run)"
    md = (f"# Results\n\nData: {source}\n\nTarget = Scratch's final validation loss: {target_line}. "
          "FLOPs saving = 1 - F_method / F_scratch, with F_method the cumulative training FLOPs when the "
          "method's validation loss first reaches the target (linear between evaluations) and F_scratch "
          "Scratch's total; wall saving likewise with training seconds (evaluation excluded).\n\n" + table)
    (out / "results.md").write_text(md, encoding="utf-8")
    return table


def plot_loss_vs_flops(runs: dict[str, Path], target: float | None, path: Path, title: str) -> None:
    """Validation loss against cumulative training FLOPs, dashed line at Scratch's final loss (Fig. 6)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, d in runs.items():
        ev = read_evals(d)
        ax.plot([e["flops"] / 1e12 for e in ev], [e["val_loss"] for e in ev], marker=".", label=name)
    if target is not None:
        ax.axhline(target, color="gray", linestyle="--", linewidth=1, label="Scratch final loss")
    ax.set_xlabel("training TFLOPs (cumulative)")
    ax.set_ylabel("validation loss (full depth)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
