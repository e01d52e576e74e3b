"""The metric (spec, "The metric"): saving at Scratch's final validation loss, tables and the Fig. 6 plot.

FLOPs saving = ``1 - F_method / F_scratch``: ``F_scratch`` is Scratch's total training FLOPs at the end of
its run, ``F_method`` the method's cumulative FLOPs when its validation loss first reaches Scratch's final
validation loss. Wall-clock saving is the same with training seconds (evaluation time excluded), and energy to the
target likewise with the cumulative kWh of the training steps that runs with ``--energy`` log in each ``eval``
record. Between two evaluations the curve is taken as linear, so the crossing is interpolated. This is a *saving*, not a
"speedup" (``F_s / F_m - 1``).

``report_dir`` writes everything for a set of named runs: results.md/.csv, loss against FLOPs and against
training seconds, and for each growth run the sampled depths of every stage against the sampler's pmf.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..config import load_yaml  # noqa: E402
from ..method.sampling import depth_distribution  # noqa: E402
from ..method.table import resolve_method  # noqa: E402


@dataclass
class Row:
    method: str
    final_val_loss: float
    test_loss: float | None  # None: the run had no test set
    total_flops: float
    wall_s: float
    tokens_per_s: float
    flops_to_target: float | None  # None: never reached Scratch's final loss
    wall_s_to_target: float | None
    flops_saving: float | None
    wall_saving: float | None
    # --energy (codecarbon): None when the run did not measure energy, or (to target) never reached it
    energy_kwh: float | None = None
    energy_kwh_to_target: float | None = None
    emissions_kg: float | None = None
    energy_method: str | None = None


def read_events(run_dir: Path, event: str) -> list[dict]:
    """The records of one kind (``start``, ``step``, ``eval``, ...) from a run's metrics.jsonl."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == event]


def read_evals(run_dir: Path) -> list[dict]:
    return read_events(run_dir, "eval")


def read_summary(run_dir: Path) -> dict:
    """The run's summary.json, or {} when it has none."""
    path = Path(run_dir) / "summary.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def tokens_per_s(run_dir: Path) -> float:
    """Training throughput: summary.json's ``tokens_per_s``, else tokens / wall_s of the last step."""
    value = read_summary(run_dir).get("tokens_per_s")
    if value is not None:
        return float(value)
    last = read_events(run_dir, "step")[-1]
    return last["tokens"] / max(last["wall_s"], 1e-9)


def first_reach(evals: list[dict], target: float, keys: tuple[str, ...] = ("flops", "wall_s")) -> tuple | None:
    """The values of ``keys`` (FLOPs, wall seconds) at which the validation curve first reaches ``target``
    (linear between evals); None where it never does. A key the evals lack (``energy_kwh`` of a run without
    --energy) comes back None."""
    prev = None
    for e in evals:
        if e["val_loss"] <= target:
            if prev is None or prev["val_loss"] == e["val_loss"]:
                return tuple(e.get(k) for k in keys)
            f = (prev["val_loss"] - target) / (prev["val_loss"] - e["val_loss"])
            return tuple(None if prev.get(k) is None or e.get(k) is None else prev[k] + f * (e[k] - prev[k])
                         for k in keys)
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
        reach = first_reach(ev, target, ("flops", "wall_s", "energy_kwh")) if target is not None else None
        summary = read_summary(runs[name])
        energy = summary.get("energy_kwh", last.get("energy_kwh"))
        rows.append(Row(name, last["val_loss"], summary.get("test_loss"), last["flops"],
                        last["wall_s"], tokens_per_s(runs[name]),
                        reach[0] if reach else None, reach[1] if reach else None,
                        1 - reach[0] / scratch[-1]["flops"] if reach else None,
                        1 - reach[1] / scratch[-1]["wall_s"] if reach else None,
                        energy, reach[2] if reach and energy is not None else None,
                        summary.get("emissions_kg", last.get("emissions_kg")),
                        summary.get("energy_method") if energy is not None else None))
    return rows, target


def _fmt(x: float | None, kind: str, missing: str = "never reached") -> str:
    if x is None:
        return missing
    return {"loss": f"{x:.4f}", "tflops": f"{x / 1e12:.2f}", "s": f"{x:.0f}", "pct": f"{100 * x:.1f}%",
            "3g": f"{x:.3g}"}[kind]


def energy_note(rows: list[Row]) -> str | None:
    """How the energy columns were obtained (None when no run measured energy)."""
    methods = sorted({r.energy_method for r in rows if r.energy_kwh is not None and r.energy_method})
    if not any(r.energy_kwh is not None for r in rows):
        return None
    how = "; ".join(f"`{m}`" for m in methods) if methods else "n/a"
    return ("Energy (`--energy`, codecarbon): kWh of the training steps, the same interval as train s (evaluation "
            "and checkpoint writes excluded); kWh to target is the cumulative kWh logged at each evaluation, "
            "interpolated at the target like seconds (n/a: the run did not measure energy). kg CO2eq = kWh x the "
            f"grid intensity of `--country-iso-code`. How it was obtained: {how}.")


FLAT_TARGET = 0.05  # Scratch reaching its own final loss before 95% of its run means the target sits on a plateau


def flat_target_warning(rows: list[Row]) -> str | None:
    """A warning when Scratch's own curve first reaches its final loss well before its end.

    Then the curve is flat (a plateau, or noise larger than the late progress) and "FLOPs to reach Scratch's
    final loss" measures when a noisy curve first dips, not a saving: Scratch itself would show one.
    """
    scratch = next((r for r in rows if r.method == "scratch"), None)
    if scratch is None or scratch.flops_saving is None or scratch.flops_saving < FLAT_TARGET:
        return None
    return (f"Scratch itself first reaches its final validation loss after {1 - scratch.flops_saving:.0%} of its "
            "FLOPs: its curve is flat at the target, so the savings in this table measure noise, not speed. "
            "Compare final losses instead.")


def small_model_notes(runs: dict[str, Path], rows: list[Row]) -> list[str]:
    """For runs grown from a trained small model (bert2BERT, LiGO): that model's own cost and loss.

    As in both papers, the savings in the table exclude the small model's training; the note gives them with it
    included too (``1 - (F_method + F_small) / F_scratch``), for a user who would have to train it first.
    """
    notes = []
    for row in rows:
        config = Path(runs[row.method]) / "config.yaml"
        small = load_yaml(config).method.small_model if config.exists() else ""
        if not small:
            continue
        summary = read_summary(Path(small))
        if not summary:
            notes.append(f"{row.method} grew from {small} (no summary.json there: its cost is unknown).")
            continue
        scratch = next((r for r in rows if r.method == "scratch"), None)
        with_small = (f"{1 - (row.flops_to_target + summary['flops']) / scratch.total_flops:.1%}"
                      if scratch and row.flops_to_target is not None else "n/a")
        notes.append(f"{row.method} grew from `{small}` ({summary['flops'] / 1e12:.2f} TFLOPs of training, final "
                     f"val loss {summary['final_val_loss']:.4f}); not counted above, as in the papers. FLOPs "
                     f"saving with it counted: {with_small}.")
    return notes


def write_results(rows: list[Row], target: float | None, out: Path, source: str, notes: list[str] = ()) -> str:
    """Write results.csv and results.md; return the Markdown table."""
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    note = energy_note(rows)  # the energy columns only when some run measured energy (--energy)
    head = ("| method | final val loss | test loss | total TFLOPs | train s | tokens/s | TFLOPs to target "
            "| s to target | FLOPs saving | wall saving |" + (" kWh | kWh to target | kg CO2eq |" if note else "")
            + "\n|---|---|---|---|---|---|---|---|---|---|" + ("---|---|---|" if note else "") + "\n")

    def energy_cells(r: Row) -> str:
        if not note:
            return ""
        reached = r.energy_kwh is not None and target is not None and r.flops_to_target is None
        to_target = _fmt(r.energy_kwh_to_target, "3g", "never reached" if reached else "n/a")
        return f" {_fmt(r.energy_kwh, '3g', 'n/a')} | {to_target} | {_fmt(r.emissions_kg, '3g', 'n/a')} |"

    table = head + "".join(
        f"| {r.method} | {_fmt(r.final_val_loss, 'loss')} | {_fmt(r.test_loss, 'loss', 'n/a')} "
        f"| {_fmt(r.total_flops, 'tflops')} | {_fmt(r.wall_s, 's')} | {_fmt(r.tokens_per_s, 's')} "
        f"| {_fmt(r.flops_to_target, 'tflops')} | {_fmt(r.wall_s_to_target, 's')} | {_fmt(r.flops_saving, 'pct')} "
        f"| {_fmt(r.wall_saving, 'pct')} |{energy_cells(r)}\n" for r in rows)
    target_line = f"{target:.4f}" if target is not None else "n/a (no scratch run)"
    warning = flat_target_warning(rows)
    md = (f"# Results\n\nData: {source}\n\nTarget = Scratch's final validation loss: {target_line}. "
          "FLOPs saving = 1 - F_method / F_scratch, with F_method the cumulative training FLOPs when the "
          "method's validation loss first reaches the target (linear between evaluations) and F_scratch "
          "Scratch's total; wall saving likewise with training seconds (evaluation excluded). Test loss is "
          "scored once at the end of the run at full depth (n/a: no test set); tokens/s is training tokens "
          "per training second.\n\n" + (f"**Warning:** {warning}\n\n" if warning else "") + table
          + "".join(f"\n{n}\n" for n in [*notes, *([note] if note else [])]))
    (out / "results.md").write_text(md, encoding="utf-8")
    return table


def _plot_loss(runs: dict[str, Path], target: float | None, path: Path, title: str, key: str, scale: float,
               xlabel: str, ylim: tuple[float, float] | None = None) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.get_cmap("tab20" if len(runs) > 10 else "tab10").colors  # distinct colours up to 20 runs
    for i, (name, d) in enumerate(runs.items()):
        ev = read_evals(d)
        ax.plot([e[key] / scale for e in ev], [e["val_loss"] for e in ev], marker=".", label=name,
                color=colors[i % len(colors)])
    if ylim:
        ax.set_ylim(*ylim)
    if target is not None:
        ax.axhline(target, color="gray", linestyle="--", linewidth=1, label="Scratch final loss")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation loss (full depth)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7 if len(runs) > 6 else None, ncol=2 if len(runs) > 6 else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_loss_vs_flops(runs: dict[str, Path], target: float | None, path: Path, title: str,
                       ylim: tuple[float, float] | None = None) -> None:
    """Validation loss against cumulative training FLOPs, dashed line at Scratch's final loss (Fig. 6)."""
    _plot_loss(runs, target, path, title, "flops", 1e12, "training TFLOPs (cumulative)", ylim)


def plot_loss_vs_wall(runs: dict[str, Path], target: float | None, path: Path, title: str) -> None:
    """Validation loss against cumulative training seconds (evaluation excluded), dashed line at the target."""
    _plot_loss(runs, target, path, title, "wall_s", 1.0, "training seconds (cumulative, evaluation excluded)")


def depth_histograms(run_dir: Path) -> list[dict]:
    """Per stage: live layers, steps, counts of each sampled depth, the sampler's pmf and their TV distance."""
    cfg = load_yaml(Path(run_dir) / "config.yaml")
    depth = cfg.model.layers
    sampler = resolve_method(cfg.method, depth).sampler
    by_stage: dict[int, list[dict]] = {}
    for s in read_events(run_dir, "step"):
        by_stage.setdefault(s["stage"], []).append(s)
    out = []
    for stage, steps in sorted(by_stage.items()):
        n_live = steps[0]["live_layers"]
        pmf = depth_distribution(sampler, n_live, depth)
        counts = {d: 0 for d in pmf}
        for s in steps:
            for d in s["depth"]:
                counts[d] += 1
        draws = sum(counts.values())
        tv = 0.5 * sum(abs(counts[d] / draws - p) for d, p in pmf.items())
        out.append({"stage": stage, "live_layers": n_live, "steps": len(steps), "draws": draws,
                    "counts": counts, "pmf": pmf, "tv": tv})
    return out


def plot_depth_histograms(run_dir: Path, path: Path, title: str) -> list[dict]:
    """One subplot per stage: empirical depth frequencies next to the analytic pmf.

    Also writes the numbers (see ``depth_histograms``) to ``path`` with a .json suffix and returns them.
    """
    stages = depth_histograms(run_dir)
    fig, axes = plt.subplots(1, len(stages), figsize=(3.2 * len(stages), 3.2), squeeze=False)
    for ax, st in zip(axes[0], stages, strict=True):
        ds = list(st["pmf"])
        ax.bar([d - 0.2 for d in ds], [st["counts"][d] / st["draws"] for d in ds], width=0.4, label="sampled")
        ax.bar([d + 0.2 for d in ds], [st["pmf"][d] for d in ds], width=0.4, label="analytic")
        ax.set_title(f"N={st['live_layers']}, {st['steps']} steps, TV={st['tv']:.3f}", fontsize=8)
        ax.set_xlabel("depth d")
        ax.set_xticks(ds)
    axes[0][0].set_ylabel("frequency")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    Path(path).with_suffix(".json").write_text(json.dumps(stages, indent=2), encoding="utf-8")
    return stages


def report_dir(out: Path, runs: dict[str, Path], title: str) -> str:
    """Write results.md/.csv, loss_vs_flops.png, loss_vs_wall.png and depth_<name>.png (+ .json) for each
    run with more than one stage into ``out``; return the Markdown table."""
    out = Path(out)
    rows, target = summarize(runs)
    first = read_events(next(iter(runs.values())), "start")
    table = write_results(rows, target, out, first[0].get("source", "n/a") if first else "n/a",
                          small_model_notes(runs, rows))
    plot_loss_vs_flops(runs, target, out / "loss_vs_flops.png", title)
    plot_loss_vs_wall(runs, target, out / "loss_vs_wall.png", title)
    for name, d in runs.items():
        start = read_events(d, "start")
        if start and len(start[0]["schedule"]["stages"]) > 1:
            plot_depth_histograms(d, out / f"depth_{name}.png", f"{name}: sampled depth per stage")
    return table
