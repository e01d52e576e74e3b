"""Real-data benchmark: Scratch vs StackBERT vs Apollo and Apollo's ablations on WikiText-2.

Every run shares the preset, seed, data order, token budget and learning-rate schedule; only the method
differs. Variants (paper Fig. 7 and Table 3):

* ``scratch``, ``stackbert``, ``apollo`` - the three methods with their spec defaults;
* ``apollo-es`` / ``apollo-us`` / ``apollo-fs`` / ``apollo-none`` - Apollo with another depth sampler;
* ``apollo-stacking`` - Apollo with stacking instead of interpolation.

A finished run (its ``summary.json`` exists and its config is the one asked for) is kept, so a benchmark
cut short is resumed by running the same command again; an unfinished run is trained again from its start,
never reported half-done. Writes ``results.md/.csv``, ``loss_vs_flops.png``, ``loss_vs_wall.png`` and a
depth histogram per growth run into ``--out``, plus ``benchmark.json`` (command, machine, wall time).

    python benchmarks/wikitext.py --preset gpt-tiny --data-dir PATH/wikitext-2 --tokens 2000000 \\
        --out benchmarks/results/wikitext2-gpt-tiny
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from apollo.config import (
    ApolloError,
    DataConfig,
    MethodConfig,
    ModelConfig,
    RunConfig,
    config_changes,
    default_ffn,
    load_yaml,
    preset,
    to_dict,
)
from apollo.data import load_lm_data
from apollo.method.table import FROM_SMALL, resolve_method
from apollo.runtime.train import train

VARIANTS = {
    "scratch": MethodConfig("scratch"),
    "stackbert": MethodConfig("stackbert"),
    "apollo": MethodConfig("apollo"),
    "apollo-plus": MethodConfig("apollo-plus"),
    "apollo-none": MethodConfig("apollo", sampler="none"),
    "apollo-stacking": MethodConfig("apollo", growth="stacking"),
    "apollo-es": MethodConfig("apollo", sampler="es"),
    "apollo-us": MethodConfig("apollo", sampler="us"),
    "apollo-fs": MethodConfig("apollo", sampler="fs"),
    # Issue 5 diagnosis: one ingredient changed at a time (first stage, moments, LR at growth, proportions).
    "apollo-3": MethodConfig("apollo", stages=(3, 6, 12), switch=(0.10, 0.25)),
    "apollo-3-none": MethodConfig("apollo", stages=(3, 6, 12), switch=(0.10, 0.25), sampler="none"),
    "apollo-reset": MethodConfig("apollo", moments="reset"),
    "apollo-rewarm": MethodConfig("apollo", rewarm=0.02),
    "apollo-none-zeroed": MethodConfig("apollo", sampler="none", new_layers="zeroed"),
    "apollo-late": MethodConfig("apollo", switch=(0.10, 0.20, 0.40)),
    # Candidates for apollo-plus.
    "cand-3-zeroed": MethodConfig("apollo", stages=(3, 6, 12), switch=(0.10, 0.25), sampler="none",
                                  new_layers="zeroed"),
    "cand-3-zeroed-rewarm": MethodConfig("apollo", stages=(3, 6, 12), switch=(0.10, 0.25), sampler="none",
                                         new_layers="zeroed", rewarm=0.02),
    # cand-3-zeroed-long became apollo-plus (same resolved config under the apollo name).
    "cand-3-zeroed-long": MethodConfig("apollo", stages=(3, 6, 12), switch=(0.20, 0.40), sampler="none",
                                       new_layers="zeroed"),
    "stackbert-zeroed": MethodConfig("stackbert", new_layers="zeroed"),
    "cand-stack-zeroed-long": MethodConfig("stackbert", switch=(0.20, 0.40), new_layers="zeroed"),
    "cand-3-zeroed-long-reset": MethodConfig("apollo-plus", moments="reset"),
    "cand-1-stack-zeroed": MethodConfig("apollo", sampler="none", growth="stacking", new_layers="zeroed"),
    # Issue 6: growth from a trained smaller model (--small-model).
    "bert2bert": MethodConfig("bert2bert"),
    "bert2bert-fpi": MethodConfig("bert2bert", width_init="fpi"),
    "ligo": MethodConfig("ligo"),
    # Issue 18: the 2024-2026 growth methods.
    "zero-layer": MethodConfig("zero-layer"),
    "one-layer": MethodConfig("one-layer"),
    "gstack": MethodConfig("gstack"),
    "midas": MethodConfig("midas"),
    "apollo-jump": MethodConfig("apollo-jump"),
    "apollo-twostep": MethodConfig("apollo-twostep"),
    "jump-2-12-70": MethodConfig("apollo-jump", stages=(2, 12), switch=(0.70,)),  # its first definition
    # Issue 18: candidates for our method (later and fewer expansions; a looped 1-layer stage untied late).
    "ours-3-6-12-30-60": MethodConfig("apollo-plus", switch=(0.30, 0.60)),
    "ours-3-6-12-40-70": MethodConfig("apollo-plus", switch=(0.40, 0.70)),
    "ours-3-12-50": MethodConfig("apollo-plus", stages=(3, 12), switch=(0.50,)),
    "ours-4-12-60": MethodConfig("apollo-plus", stages=(4, 12), switch=(0.60,)),
    "ours-loop-1-12-50": MethodConfig("apollo", stages=(1, 12), switch=(0.50,)),
    "ours-loop-3-12-50": MethodConfig("apollo", stages=(3, 12), switch=(0.50,)),
    "ours-3-6-12-50-80": MethodConfig("apollo-plus", switch=(0.50, 0.80)),
    "ours-3-6-12-45-75": MethodConfig("apollo-plus", switch=(0.45, 0.75)),
    "ours-4-8-12-40-70": MethodConfig("apollo-plus", stages=(4, 8, 12), switch=(0.40, 0.70)),
    "ours-2-4-12-40-70": MethodConfig("apollo-plus", stages=(2, 4, 12), switch=(0.40, 0.70)),
    "ours-3-6-12-40-70-reset": MethodConfig("apollo-plus", switch=(0.40, 0.70), moments="reset"),
    "ours-2-4-12-50-80": MethodConfig("apollo-plus", stages=(2, 4, 12), switch=(0.50, 0.80)),
    "ours-1-2-4-12-20-40-70": MethodConfig("apollo-plus", stages=(1, 2, 4, 12), switch=(0.20, 0.40, 0.70)),
    "ours-2-4-8-12-30-55-80": MethodConfig("apollo-plus", stages=(2, 4, 8, 12), switch=(0.30, 0.55, 0.80)),
    "ours-2-12-70": MethodConfig("apollo-plus", stages=(2, 12), switch=(0.70,)),
    "ours-1-3-12-40-70": MethodConfig("apollo-plus", stages=(1, 3, 12), switch=(0.40, 0.70)),
    # Second round, at the headline budget with the zero/one-layer paper's WSD (decay over the last 10%).
    "ours-1-12-80": MethodConfig("apollo-plus", stages=(1, 12), switch=(0.80,)),
    "ours-2-12-80": MethodConfig("apollo-plus", stages=(2, 12), switch=(0.80,)),
    "one-layer-85": MethodConfig("one-layer", switch=(0.85,)),
    # Third round, BERT at 40% masking: the jump earlier, for a masked LM that learns context late.
    "jump-1-12-60": MethodConfig("apollo-jump", switch=(0.60,)),
    "jump-1-12-70": MethodConfig("apollo-jump", switch=(0.70,)),
    "jump-1-12-50": MethodConfig("apollo-jump", switch=(0.50,)),
}
FILES = {"train": "wiki.train.tokens.repack", "valid": "wiki.valid.tokens", "test": "wiki.test.tokens"}


def sized(cfg: RunConfig, hidden: int) -> ModelConfig:
    """The preset's model at another width (0 = the preset's): ffn 4x (LLaMA 8/3x), heads hidden / 32."""
    m = cfg.model
    if hidden:
        m = dataclasses.replace(m, hidden=hidden, ffn=default_ffn(m.arch, hidden), heads=max(1, hidden // 32))
    return m


def run_config(args: argparse.Namespace) -> RunConfig:
    """The shared configuration of every run: the preset, with the benchmark's overrides."""
    cfg = preset(args.preset)
    m = sized(cfg, args.hidden)
    t = dataclasses.replace(cfg.train, tokens=args.tokens, eval_every=args.eval_every, eval_blocks=args.eval_blocks,
                            seed=args.seed, threads=args.threads, progress=not args.no_progress,
                            **({"lr": args.lr} if args.lr else {}))
    d = Path(args.data_dir)
    data = DataConfig(data=(str(d / FILES["train"]),), valid=(str(d / FILES["valid"]),),
                      test=(str(d / FILES["test"]),))
    return dataclasses.replace(cfg, model=m, train=t, data=data)


def finished(run_dir: Path, cfg: RunConfig) -> bool:
    """True when ``run_dir`` holds a completed run of exactly ``cfg`` (method resolved as train() saves it)."""
    if not (run_dir / "summary.json").exists() or not (run_dir / "config.yaml").exists():
        return False
    resolved = dataclasses.replace(cfg, method=resolve_method(cfg.method, cfg.model.layers))
    return not config_changes(load_yaml(run_dir / "config.yaml"), resolved)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt-tiny", choices=["bert-tiny", "gpt-tiny", "roberta-tiny", "llama-tiny"])
    ap.add_argument("--data-dir", required=True, help="directory with WikiText-2's " + ", ".join(FILES.values()))
    ap.add_argument("--tokens", type=int, default=2_000_000, help="training tokens per run")
    ap.add_argument("--hidden", type=int, default=0,
                    help="override the preset's width (ffn = 4x, llama 8/3x; heads = h/32)")
    ap.add_argument("--lr", type=float, default=0.0, help="override the preset's peak learning rate")
    ap.add_argument("--methods", default=",".join(VARIANTS), help="comma list of " + ", ".join(VARIANTS))
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--eval-blocks", type=int, default=160)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--small-model", default="", help="trained smaller run for bert2bert / ligo")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    names = [n for n in args.methods.split(",") if n]
    try:
        unknown = [n for n in names if n not in VARIANTS]
        if unknown:
            raise ApolloError(f"unknown variant {unknown[0]!r} (choose from {', '.join(VARIANTS)})")
        for name in FILES.values():
            if not (Path(args.data_dir) / name).is_file():
                raise ApolloError(f"{args.data_dir} has no {name}")
        base = dataclasses.replace(run_config(args), out="")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        started = time.time()
        data = None
        runs = {}
        for name in names:
            method = VARIANTS[name]
            if method.method in FROM_SMALL:
                if not args.small_model:
                    raise ApolloError(f"{name} needs --small-model RUN_DIR")
                method = dataclasses.replace(method, small_model=args.small_model)
            cfg = dataclasses.replace(base, method=method, out=str(out / name))
            runs[name] = out / name
            if finished(out / name, cfg):
                print(f"[{name}] finished run found, kept", flush=True)
                continue
            data = data or load_lm_data(base.data, base.model, base.train.seed)
            train(cfg, data, overwrite=True)
        from apollo.measure.report import report_dir

        title = (f"{args.preset} (hidden {base.model.hidden}), WikiText-2, {args.tokens / 1e6:g}M tokens, "
                 f"seed {args.seed}")
        print(report_dir(out, runs, title))
    except ApolloError as e:
        sys.exit(f"wikitext.py: error: {e}")
    meta = {"command": "python " + " ".join(sys.argv), "config": to_dict(base), "methods": names,
            "wall_s_this_invocation": round(time.time() - started),
            "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    (out / "benchmark.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
