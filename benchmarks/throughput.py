"""Training throughput (tokens/s) of the CPU presets at several executed depths, through apollo's own step.

Each measurement is a real training step as `apollo train` runs it: a batch from `Batches` (MLM masking
included), the live layers shared across depth d, forward + backward, clipping and an AdamW step over
the live parameters. Depth d = N live layers (the cheapest step of a stage) and d = 12.

    python benchmarks/throughput.py --out benchmarks/results/throughput
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from apollo.config import preset
from apollo.data import Batches, pack_blocks, synthetic_corpus, train_tokenizer
from apollo.measure.flops import fixed_flops, forward_flops
from apollo.method.growth import layer_map, shared_layers
from apollo.models import build_model, hf_config, lm_loss
from apollo.runtime.train import make_optimizer


def measure(name: str, live: int, depth: int, steps: int, warmup: int) -> dict:
    cfg = preset(name)
    m, t = cfg.model, cfg.train
    texts = synthetic_corpus(20000)
    tok = train_tokenizer(texts, m.arch, m.vocab)
    batches = Batches(pack_blocks(texts, tok, m.seq_len, m.arch), t.batch_size, 0, tok, m.arch == "bert")
    model = build_model(m, live, seed=0)
    opt = make_optimizer(model, t)
    positions = layer_map("interpolation", live, depth)
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        with shared_layers(model, positions):
            loss = lm_loss(model, batches.batch(i), m.arch == "bert")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    tokens = t.batch_size * m.seq_len
    median = sorted(times)[len(times) // 2]
    return {"preset": name, "live_layers": live, "depth": depth, "batch": t.batch_size, "seq_len": m.seq_len,
            "step_s_median": round(median, 4), "tokens_per_s": round(tokens / median),
            "flops_per_step": 3 * forward_flops(hf_config(m), depth, tokens, m.seq_len)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/throughput")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in ("bert-tiny", "gpt-tiny"):
        m = preset(name).model
        hf, tokens = hf_config(m), preset(name).train.batch_size * m.seq_len
        share = fixed_flops(hf, tokens) / forward_flops(hf, m.layers, tokens, m.seq_len)
        for live, depth in ((1, 1), (3, 3), (6, 6), (12, 12)):
            row = measure(name, live, depth, args.steps, args.warmup)
            row["head_flops_share_at_L"] = round(share, 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    lines = ["| preset | depth (= live layers) | tokens/s | step s (median) | FLOPs/step (G) | time vs d=12 "
             "| FLOPs vs d=12 |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        full = next(x for x in rows if x["preset"] == r["preset"] and x["depth"] == 12)
        lines.append(f"| {r['preset']} | {r['depth']} | {r['tokens_per_s']} | {r['step_s_median']} "
                     f"| {r['flops_per_step'] / 1e9:.1f} | {r['step_s_median'] / full['step_s_median']:.2f} "
                     f"| {r['flops_per_step'] / full['flops_per_step']:.2f} |")
    note = (f"\n\n{args.threads} torch threads, fp32, batch {rows[0]['batch']} x seq {rows[0]['seq_len']}, "
            f"median of {args.steps} steps after {args.warmup} warm-up steps. Embeddings + LM head share of a "
            f"full-depth step's FLOPs: bert-tiny {rows[0]['head_flops_share_at_L']:.1%}, "
            f"gpt-tiny {rows[-1]['head_flops_share_at_L']:.1%}.\n")
    # Fixed per-step time (embeddings, LM head, optimizer, batch, Python): t(1) minus one layer's time, with one
    # layer's time = (t(12) - t(1)) / 11 from the two measured depths.
    for name in ("bert-tiny", "gpt-tiny"):
        t1, t12 = (next(r["step_s_median"] for r in rows if r["preset"] == name and r["depth"] == d) for d in (1, 12))
        fixed = t1 - (t12 - t1) / 11
        note += (f"\n{name}: fixed per-step time (not shrinking with depth) {fixed * 1000:.0f} ms = "
                 f"{fixed / t12:.1%} of a full-depth step.")
    out.with_suffix(".md").write_text("\n".join(lines) + note + "\n")
    print("\n".join(lines) + note)


if __name__ == "__main__":
    main()
