"""Where a growth run's gradient spike lives: per step, the parameters with the largest gradient norms, the rows of
the token and position embeddings that carry it, and the smallest input std of any LayerNorm.

Trains one run (the preset and method given, its first ``--steps`` steps; the data is the built-in synthetic
corpus unless ``--data`` / ``--valid`` are given) through ``apollo.runtime.train.train``'s ``on_backward`` hook, which
reads the gradients before clipping. Writes ``probe.jsonl`` (one record per step) and ``probe.md`` (the steps whose
total norm exceeds ``--threshold``) into ``--out``.

    python benchmarks/spike_probe.py --preset gpt-tiny --method apollo --tokens 600000 --steps 72 \\
        --out benchmarks/results/spikes/demo-apollo
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from apollo.config import DataConfig, MethodConfig, preset
from apollo.runtime.train import train


class Stop(Exception):
    """Raised by the probe after its last step: the run ends there, unfinished."""


class Probe:
    """Collects, per optimizer step, the gradient facts that locate a spike."""

    def __init__(self, log, stop_after: int):
        self.log, self.stop_after, self.ln_min, self.hooked = log, stop_after, {}, set()

    def _hook(self, name: str):
        def record(module, inputs, output):
            if module.training:
                std = inputs[0].detach().float().std(-1).min()
                self.ln_min[name] = min(self.ln_min.get(name, float("inf")), float(std))
        return record

    def __call__(self, step: int, model: torch.nn.Module) -> None:
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        norms = {n: float(g.norm()) for n, g in grads.items()}
        rows = {}
        for name in ("transformer.wte.weight", "transformer.wpe.weight"):  # GPT-2's token / position tables
            if name in grads:
                r = grads[name].norm(dim=1)
                rows[name] = [(int(i), round(float(r[i]), 4)) for i in r.argsort(descending=True)[:3]]
        ln = sorted(self.ln_min.items(), key=lambda kv: kv[1])[:3]
        self.log.write(json.dumps({"step": step, "total": round(sum(v * v for v in norms.values()) ** 0.5, 4),
                                   "top_params": sorted(norms.items(), key=lambda kv: -kv[1])[:4],
                                   "top_rows": rows, "min_ln_input_std": ln}) + "\n")
        self.ln_min = {}
        for name, module in model.named_modules():  # layers grown at this step are hooked for the next
            if isinstance(module, torch.nn.LayerNorm) and id(module) not in self.hooked:
                self.hooked.add(id(module))
                module.register_forward_hook(self._hook(name))
        if step + 1 >= self.stop_after:
            raise Stop


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt-tiny")
    ap.add_argument("--method", default="apollo")
    ap.add_argument("--moments", default="copy")
    ap.add_argument("--lr", type=float, default=0.0)
    ap.add_argument("--tokens", type=int, default=600_000, help="the run's length (sets the stage schedule)")
    ap.add_argument("--steps", type=int, default=72, help="steps to train and probe")
    ap.add_argument("--data", nargs="*", default=[])
    ap.add_argument("--valid", nargs="*", default=[])
    ap.add_argument("--threshold", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    cfg = preset(args.preset)
    t = dataclasses.replace(cfg.train, tokens=args.tokens, eval_every=20, eval_blocks=100, threads=args.threads,
                            progress=False, **({"lr": args.lr} if args.lr else {}))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.replace(cfg, train=t, method=MethodConfig(args.method, moments=args.moments),
                              data=DataConfig(data=tuple(args.data), valid=tuple(args.valid)), out=str(out / "run"))
    with open(out / "probe.jsonl", "w", encoding="utf-8") as log:
        try:
            train(cfg, overwrite=True, on_backward=Probe(log, args.steps))
        except Stop:
            pass
    records = [json.loads(line) for line in (out / "probe.jsonl").read_text(encoding="utf-8").splitlines()]
    lines = [f"# Gradient spikes: {args.preset}, {args.method} (moments {args.moments}), lr {t.lr:g}, "
             f"{args.tokens} tokens, steps 0-{args.steps - 1}", "",
             f"Steps whose total gradient norm (before clipping) exceeds {args.threshold}.", "",
             "| step | total norm | largest parameter gradients | embedding rows (id, norm) | smallest LN input std |",
             "|---|---|---|---|---|"]
    for r in records:
        if r["total"] > args.threshold:
            params = ", ".join(f"{n.replace('transformer.', '')} {v:.2f}" for n, v in r["top_params"][:3])
            rows = "; ".join(f"{n.split('.')[1]} {v[:2]}" for n, v in r["top_rows"].items())
            ln = ", ".join(f"{n.replace('transformer.', '')} {v:.4f}" for n, v in r["min_ln_input_std"][:2])
            lines.append(f"| {r['step']} | {r['total']:.2f} | {params} | {rows} | {ln} |")
    (out / "probe.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
