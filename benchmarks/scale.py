"""Throughput of real `apollo train` runs: processes (torchrun DDP), precision and torch.compile, at one global batch.

Each configuration ``PROCS:PRECISION[:compile]`` runs Scratch (full depth, so every step costs the same) for
``--steps`` optimizer steps with the same global batch (``--global-batch`` sequences; per-process micro-batch =
global / PROCS, no accumulation) and reports the steady-state rate after ``--skip`` warm-up steps (compilation and
allocator warm-up excluded): tokens/s, model FLOP/s from apollo's analytic FLOP count (the one every saving uses)
and, with ``--peak-tflops``, model FLOP utilisation (MFU = achieved / peak).

    python benchmarks/scale.py --preset gpt-tiny --configs 1:fp32,2:fp32,1:bf16,2:bf16 --global-batch 32 \\
        --cores 2 --out benchmarks/results/scale/cpu-gpt-tiny
    python benchmarks/scale.py --preset bert-base --configs 1:fp32,1:bf16,1:bf16:compile --global-batch 32 \\
        --device cuda --peak-tflops 989 --out results/gpu-bert-base
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run_config(spec: str, args: argparse.Namespace, work: Path) -> dict:
    procs, precision, *rest = spec.split(":")
    procs, compiled = int(procs), "compile" in rest
    if args.global_batch % procs:
        raise SystemExit(f"--global-batch {args.global_batch} is not divisible by {procs} processes")
    out = work / spec.replace(":", "-")
    threads = max(1, args.cores // procs)  # the same cores in every configuration
    cmd = ["-m", "apollo", "train", "--preset", args.preset, "--method", "scratch", "--steps", str(args.steps),
           "--batch-size", str(args.global_batch // procs), "--global-batch", "0", "--grad-accum", "1",
           "--precision", precision, "--device", args.device, "--threads", str(threads), "--eval-every", "100000",
           "--eval-blocks", "1", "--synthetic-sentences", str(args.sentences), "--no-progress", "--out", str(out)]
    cmd += ["--compile"] if compiled else []
    if procs > 1:
        cmd = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), *cmd]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    r = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{spec} failed:\n{r.stderr[-3000:]}")
    steps = [s for s in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if s["event"] == "step"]
    a, b = steps[args.skip - 1], steps[-1]
    seconds = b["wall_s"] - a["wall_s"]
    row = {"config": spec, "processes": procs, "precision": precision, "compile": compiled, "threads_each": threads,
           "micro_batch": args.global_batch // procs, "steps_timed": len(steps) - args.skip,
           "tokens_per_s": round((b["tokens"] - a["tokens"]) / seconds),
           "model_tflops_per_s": round((b["flops"] - a["flops"]) / seconds / 1e12, 4),
           "step_s": round(seconds / (len(steps) - args.skip), 4), "final_loss": b["loss"]}
    if args.peak_tflops:
        row["mfu"] = round(row["model_tflops_per_s"] / args.peak_tflops, 4)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt-tiny")
    ap.add_argument("--configs", default="1:fp32,2:fp32,1:bf16,2:bf16", help="comma list of PROCS:PRECISION[:compile]")
    ap.add_argument("--global-batch", type=int, default=32, help="sequences per optimizer step, over all processes")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--skip", type=int, default=10, help="warm-up steps left out of the rate")
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="CPU threads shared by the processes")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--sentences", type=int, default=60000, help="synthetic corpus size")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="the device's peak for MFU (0 = not reported)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        rows = [run_config(spec, args, Path(work)) for spec in args.configs.split(",")]
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() and args.device != "cpu" else ""
    meta = {"command": "python " + " ".join(sys.argv), "preset": args.preset, "global_batch": args.global_batch,
            "device": gpu or f"CPU ({platform.processor() or platform.machine()}, {args.cores} cores)",
            "torch": torch.__version__, "rows": rows}
    (out / "results.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    cols = ["config", "processes", "precision", "compile", "threads_each", "micro_batch", "tokens_per_s",
            "model_tflops_per_s", "step_s", *(["mfu"] if args.peak_tflops else [])]
    lines = [f"`{meta['command']}` on {meta['device']}, torch {torch.__version__}", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
