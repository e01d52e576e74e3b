"""Full-depth training throughput of `apollo train` against a minimal plain PyTorch loop.

The reference is the loop anyone would write around the same Hugging Face model: pre-built batches,
``model(**batch).loss.backward()``, gradient clipping, ``torch.optim.AdamW.step()``, ``zero_grad``. apollo's
number is its own ``train()`` (Scratch, all 12 layers), timed by the loop itself (evaluation excluded): that
includes building each batch (MLM masking), the layer map, FLOP accounting and the metrics log.

For BERT the plain loop is run twice: with HF's loss (LM head at all positions, what a user gets from
``BertForMaskedLM``), and with apollo's sparse MLM loss (head at masked positions only), which isolates the
cost of apollo's loop itself. The two sides alternate in rounds, so drifting machine load hits both.

    python benchmarks/reference_loop.py --out benchmarks/results/reference_loop
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from apollo.config import MethodConfig, preset
from apollo.data import Batches, LMData, pack_blocks, synthetic_corpus, train_tokenizer
from apollo.models import build_model, lm_loss
from apollo.runtime.train import train


def plain_loop(name: str, batches: list[dict], sparse: bool) -> list[float]:
    """Per-step seconds of the minimal loop over the preset's full-depth HF model."""
    cfg = preset(name)
    model = build_model(cfg.model, cfg.model.layers, seed=0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    times = []
    for batch in batches:
        start = time.perf_counter()
        loss = lm_loss(model, batch, True) if sparse else model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def apollo_loop(name: str, data: LMData, steps: int, out: Path) -> list[float]:
    """Per-step seconds of apollo's own training loop (Scratch), read back from its metrics log."""
    cfg = preset(name)
    cfg = dataclasses.replace(cfg, out=str(out), method=MethodConfig("scratch"), train=dataclasses.replace(
        cfg.train, steps=steps, tokens=0, eval_every=10**9, eval_blocks=1, progress=False))
    train(cfg, data, overwrite=True)
    walls = [json.loads(line)["wall_s"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if '"event": "step"' in line]
    return [b - a for a, b in zip([0.0] + walls[:-1], walls, strict=True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/reference_loop")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per round (the first 3 are warm-up)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in ("gpt-tiny", "bert-tiny"):
        m, t = preset(name).model, preset(name).train
        mlm = m.arch == "bert"
        texts = synthetic_corpus(20000)
        tok = train_tokenizer(texts, m.arch, m.vocab)
        blocks = pack_blocks(texts, tok, m.seq_len, m.arch)
        data = LMData(tok, blocks, blocks[:16], mlm, "synthetic")
        batches = Batches(blocks, t.batch_size, t.seed, tok, mlm)
        prebuilt = [batches.batch(i) for i in range(args.steps)]
        variants = {"plain (HF loss)": [], "apollo train": []}
        if mlm:
            variants["plain (sparse MLM loss)"] = []
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(args.rounds):
                variants["plain (HF loss)"] += plain_loop(name, prebuilt, sparse=False)[3:]
                if mlm:
                    variants["plain (sparse MLM loss)"] += plain_loop(name, prebuilt, sparse=True)[3:]
                variants["apollo train"] += apollo_loop(name, data, args.steps, Path(tmp) / "run")[3:]
        tokens = t.batch_size * m.seq_len
        medians = {k: statistics.median(v) for k, v in variants.items()}
        for k, med in medians.items():
            row = {"preset": name, "loop": k, "step_s_median": round(med, 4), "tokens_per_s": round(tokens / med),
                   "apollo_vs_this": round(medians[k] / medians["apollo train"], 3), "steps": len(variants[k])}
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    lines = ["| preset | loop | tokens/s | step s (median) | apollo throughput / this loop's |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['preset']} | {r['loop']} | {r['tokens_per_s']} | {r['step_s_median']} | {r['apollo_vs_this']} |"
              for r in rows]
    note = (f"\n\nFull depth (12 layers), batch {preset('gpt-tiny').train.batch_size} x seq "
            f"{preset('gpt-tiny').model.seq_len}, {args.threads} torch threads, fp32; median over {args.rounds} "
            f"alternating rounds of {args.steps - 3} timed steps (3 warm-up steps dropped per round).\n")
    out.with_suffix(".md").write_text("\n".join(lines) + note)
    print("\n".join(lines) + note)


if __name__ == "__main__":
    main()
