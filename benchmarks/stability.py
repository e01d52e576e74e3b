"""Stability of depth expansion, the paper's Tables 2-3 and Fig. 5: interpolation vs stacking at 6 -> 12 layers.

1. Train a 6-layer model (Scratch, same preset otherwise) and expand it to 12 layers by stacking (Eq. 11) and by
   interpolation (Eq. 12); score those, the 6-layer source and a random 12-layer init on the same validation blocks:
   loss, per-batch gradient norm of the LM loss (min / median / max) and the output activations (stats + histogram).
2. The same inside Apollo runs (interpolation, and growth=stacking) on both sides of the 6 -> 12 switch, measured
   through ``train``'s ``on_grow`` hook; each run stops right after that switch (25% of ``--run-tokens``).

    python benchmarks/stability.py --preset gpt-tiny --data PATH/wikitext-2/wiki.train.tokens.repack \\
        --valid PATH/wikitext-2/wiki.valid.tokens

Writes ``stability.md``, ``stability.json`` and ``activations.png`` to ``--out`` (default
``benchmarks/results/stability-<preset>``); the training runs go to ``--runs`` (default ``runs/stability-<preset>``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM  # noqa: E402

from apollo.config import DataConfig, MethodConfig, preset  # noqa: E402
from apollo.data import load_lm_data, valid_batches  # noqa: E402
from apollo.measure.stability import GrowthProbe, Measurement, StopAtGrowth, expanded, measure  # noqa: E402
from apollo.models import build_model  # noqa: E402
from apollo.runtime.train import train  # noqa: E402

HALF, FULL = 6, 12
COLUMNS = "| model | val loss | grad-norm min / median / max | act mean / std / max\\|x\\| |\n|---|---|---|---|"


def table_row(name: str, m: Measurement) -> str:
    r = m.row()
    return (f"| {name} | {r['val_loss']:.3f} | {r['grad_norm_min']:.3f} / {r['grad_norm_median']:.3f} / "
            f"{r['grad_norm_max']:.3f} | {r['act_mean']:.3f} / {r['act_std']:.3f} / {r['act_max_abs']:.2f} |")


def load_half(path: Path, arch: str):
    cls = AutoModelForMaskedLM if arch == "bert" else AutoModelForCausalLM
    model = cls.from_pretrained(path)
    if arch == "gpt2":
        model.loss_type = "ForCausalLM"  # as apollo.models.build_model sets it
    return model


def run_apollo(cfg, data, batches, growth: str, runs: Path) -> tuple[GrowthProbe, float]:
    """Train Apollo with ``growth`` until just after its 6 -> 12 switch; return the probe and the seconds taken."""
    probe = GrowthProbe(batches, data.mlm, HALF, FULL)
    run_cfg = dataclasses.replace(cfg, method=MethodConfig("apollo", growth=growth), out=str(runs / f"apollo-{growth}"))
    start = time.perf_counter()
    try:
        train(run_cfg, data, overwrite=True, on_grow=probe)
        raise RuntimeError(f"apollo ({growth}) finished without a {HALF} -> {FULL} growth")
    except StopAtGrowth as stop:
        print(f"apollo ({growth}): {stop}", flush=True)
    return probe, time.perf_counter() - start


def plot(path: Path, panels: list[tuple[str, dict[str, Measurement]]]) -> None:
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    for ax, (title, models) in zip(axes[0], panels, strict=True):
        lo = min(float(m.act_sample.min()) for m in models.values())
        hi = max(float(m.act_sample.max()) for m in models.values())
        bins = torch.linspace(lo, hi, 151).tolist()
        for name, m in models.items():
            ax.hist(m.act_sample.numpy(), bins=bins, density=True, histtype="step", linewidth=1.3, label=name)
        ax.set_yscale("log")
        ax.set_xlabel("output activation (last layer)")
        ax.set_ylabel("density (log)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def checks(models: dict[str, Measurement]) -> list[str]:
    """The paper's claims, read off the standalone table (interpolated vs stacked)."""
    src, it, st = models[f"source {HALF}L"], models["interpolated 12L"], models["stacked 12L"]
    med = {k: m.row()["grad_norm_median"] for k, m in (("it", it), ("st", st))}
    return [
        f"- lower loss after expansion with interpolation than stacking: "
        f"{'yes' if it.val_loss < st.val_loss else 'no'} ({it.val_loss:.3f} vs {st.val_loss:.3f})",
        f"- smaller median gradient norm with interpolation: {'yes' if med['it'] < med['st'] else 'no'} "
        f"({med['it']:.3f} vs {med['st']:.3f})",
        f"- activation std closer to the source's ({src.act_std:.3f}) with interpolation: "
        f"{'yes' if abs(it.act_std - src.act_std) < abs(st.act_std - src.act_std) else 'no'} "
        f"({it.act_std:.3f} vs {st.act_std:.3f})",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt-tiny", choices=["gpt-tiny", "bert-tiny"])
    ap.add_argument("--data", required=True, help="training text file (e.g. wiki.train.tokens.repack)")
    ap.add_argument("--valid", required=True, help="validation text file (e.g. wiki.valid.tokens)")
    ap.add_argument("--tokens", type=int, default=300_000, help="training budget of the 6-layer source model")
    ap.add_argument("--run-tokens", type=int, default=2_000_000, help="budget of the Apollo runs (stopped at 25%%)")
    ap.add_argument("--blocks", type=int, default=500, help="validation sequences scored")
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per gradient-norm batch")
    ap.add_argument("--out", default="", help="results dir (default benchmarks/results/stability-<preset>)")
    ap.add_argument("--runs", default="", help="training run dirs (default runs/stability-<preset>)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out or f"benchmarks/results/stability-{args.preset}")
    runs = Path(args.runs or f"runs/stability-{args.preset}")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    base = preset(args.preset)
    cfg = dataclasses.replace(
        base, data=DataConfig(data=(args.data,), valid=(args.valid,)),
        train=dataclasses.replace(base.train, seed=args.seed, threads=args.threads, progress=False))
    m12 = cfg.model
    data = load_lm_data(cfg.data, m12, args.seed)
    batches = valid_batches(data.valid, args.batch_size, data.tokenizer, data.mlm, cfg.data.mlm_probability, 0,
                            args.blocks)
    n_blocks = sum(len(b["input_ids"]) for b in batches)
    timing = {}

    # 1. The 6-layer source, its two expansions and a random 12-layer init (Tables 2-3 setup).
    start = time.perf_counter()
    half_cfg = dataclasses.replace(cfg, model=dataclasses.replace(m12, layers=HALF), method=MethodConfig("scratch"),
                                   train=dataclasses.replace(cfg.train, tokens=args.tokens), out=str(runs / "half"))
    half_summary = train(half_cfg, data, overwrite=True)
    timing["train_half_s"] = time.perf_counter() - start
    source = load_half(runs / "half" / "model", m12.arch)
    start = time.perf_counter()
    models = {f"source {HALF}L": measure(source, batches, data.mlm)}
    models["stacked 12L"] = measure(expanded(source, FULL, "stacking"), batches, data.mlm)
    models["interpolated 12L"] = measure(expanded(source, FULL, "interpolation"), batches, data.mlm)
    models["random init 12L"] = measure(build_model(m12, FULL, args.seed), batches, data.mlm)
    timing["measure_standalone_s"] = time.perf_counter() - start
    for name, m in models.items():
        print(table_row(name, m), flush=True)

    # 2. Inside Apollo, around the 6 -> 12 switch.
    run_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, tokens=args.run_tokens))
    probes = {}
    for growth in ("interpolation", "stacking"):
        probes[growth], timing[f"apollo_{growth}_s"] = run_apollo(run_cfg, data, batches, growth, runs)
        for when, m in probes[growth].results.items():
            print(table_row(f"apollo {growth} {when}", m), flush=True)
    timing["total_s"] = time.perf_counter() - started
    timing = {k: round(v, 1) for k, v in timing.items()}

    plot(out / "activations.png", [
        (f"{args.preset}: {HALF}L source and its expansions to {FULL}L", models),
        (f"inside Apollo, {HALF} -> {FULL} switch", {
            f"{g} {w}": probes[g].results[w] for g in probes for w in ("before@live", "after")}),
    ])
    switch_step = {g: p.step for g, p in probes.items()}
    setup = {"preset": args.preset, "data": args.data, "valid": args.valid, "source_tokens": args.tokens,
             "source_steps": half_summary["steps"], "source_final_val_loss": half_summary["final_val_loss"],
             "run_tokens": args.run_tokens, "switch_step": switch_step, "blocks": n_blocks,
             "batch_size": args.batch_size, "seed": args.seed, "threads": args.threads, "timing": timing}
    result = {"setup": setup, "standalone": {k: m.row() for k, m in models.items()},
              "apollo": {g: {w: m.row() for w, m in p.results.items()} for g, p in probes.items()}}
    (out / "stability.json").write_text(json.dumps(result, indent=1), encoding="utf-8")

    lines = [
        f"# Stability of depth expansion: {args.preset} (paper Tables 2-3, Fig. 5)", "",
        f"Data: `{args.data}`; validation: the first {n_blocks} blocks of `{args.valid}` in batches of "
        f"{args.batch_size} (fixed masks, seed 0). Loss: mean per predicted token. Gradient norm: total L2 norm over "
        "all parameters of one batch's mean LM loss (no clipping), min / median / max over the batches. "
        "Activations: output of the last executed layer (GPT-2: the residual stream before the final LayerNorm), "
        "every element of every block." + (" BERT is post-LN, so that output is LayerNorm-ed: mean ~0 and std ~1 by "
                                           "construction; compare the tails (max|x|, histogram)." if data.mlm else ""),
        "",
        f"## {HALF}-layer source expanded to {FULL} layers", "",
        f"The source is a {HALF}-layer Scratch run of {half_summary['steps']} steps ({args.tokens} tokens, seed "
        f"{args.seed}, final val loss {half_summary['final_val_loss']:.3f} on its eval blocks). Stacked: new layer j "
        f"= source layer j mod {HALF} (Eq. 11); interpolated: source layer j * {HALF} // {FULL} (Eq. 12); random "
        f"init: `build_model(..., {FULL}, seed={args.seed})`. No training after the expansion.", "",
        COLUMNS, *(table_row(k, m) for k, m in models.items()), "",
        *checks(models), "",
        f"## Inside Apollo at the {HALF} -> {FULL} switch", "",
        f"Apollo (LVPS sampling, default stages and switches) with interpolation growth and with stacking growth, "
        f"{args.run_tokens} tokens planned, stopped right after the {HALF} -> {FULL} switch "
        f"(step {switch_step['interpolation']}) via `train(..., on_grow=GrowthProbe(...))`. `before@live`: the "
        f"{HALF} live layers at depth {HALF}; `before@full`: the {HALF} live layers shared across depth {FULL} by "
        f"the run's own map (how Apollo evaluates and samples depth {FULL}; gradients of a shared layer are summed "
        f"over its positions); `after`: the {FULL} new layers. Growth copies weights along that same map, so "
        f"`before@full` and `after` compute the same function (same loss and activations) and differ only in "
        f"how the gradient is split over parameters.", "",
        COLUMNS,
        *(table_row(f"apollo, {g}: {w}", m) for g, p in probes.items() for w, m in p.results.items()), "",
        "![output activations](activations.png)", "",
        f"Command: `python benchmarks/stability.py --preset {args.preset} --data {args.data} --valid {args.valid} "
        f"--tokens {args.tokens} --run-tokens {args.run_tokens} --blocks {args.blocks} --threads {args.threads} "
        f"--seed {args.seed}`. Wall time: {timing['total_s']:.0f} s (CPU, torch threads: {args.threads}; "
        f"phases in stability.json).", "",
    ]
    (out / "stability.md").write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
