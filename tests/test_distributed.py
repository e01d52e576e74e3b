"""torchrun data parallelism on CPU (gloo): two processes equal one process with the same global batch."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from apollo.config import TrainConfig
from apollo.runtime.train import grad_accum

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--layers", "6", "--hidden", "32", "--heads", "2", "--ffn", "64", "--vocab", "512", "--seq-len", "16",
        "--synthetic-sentences", "1500", "--eval-blocks", "8", "--eval-every", "5", "--steps", "14", "--no-progress",
        "--method", "apollo", "--stages", "1,3,6", "--switch", "5,10", "--switch-unit", "step"]


def run(out: Path | None, *args: str, procs: int = 1, killer: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``apollo train`` (or tests/killer.py) under torchrun; --standalone picks a free port for each job."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)] if procs > 1 else []
    program = [str(ROOT / "tests" / "killer.py"), *killer, "--"] if killer else ["-m", "apollo"]
    tail = [*TINY, *args, "--out", str(out)] if out else list(args)
    return subprocess.run([sys.executable, *launcher, *program, "train", *tail], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


def records(out: Path, event: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["event"] == event]


@pytest.mark.parametrize("preset", ["gpt-tiny", "bert-tiny"])
def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(tmp_path, preset):
    """Across both growth steps; BERT's masked-token counts differ per rank, so this also checks the weighting."""
    one = run(tmp_path / "one", "--preset", preset, "--batch-size", "8", "--grad-accum", "2")
    assert one.returncode == 0, one.stderr
    two = run(tmp_path / "two", "--preset", preset, "--batch-size", "4", "--global-batch", "16", "--check-ranks",
              procs=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("final val loss") == 1  # rank 0 reports; rank 1 is silent
    a, b = load_file(tmp_path / "one/model/model.safetensors"), load_file(tmp_path / "two/model/model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 2e-5
    # every rank drew the same depths (checked by all-reduce each micro-batch) and ended with identical weights
    assert records(tmp_path / "two", "rank_check") == [{"event": "rank_check", "step": 14, "ranks": 2,
                                                        "same_weights": True}]
    s1, s2 = records(tmp_path / "one", "step"), records(tmp_path / "two", "step")
    assert [s["depth"] for s in s1] == [s["depth"] for s in s2]
    assert [(s["tokens"], s["flops"]) for s in s1] == [(s["tokens"], s["flops"]) for s in s2]
    assert all(abs(x["loss"] - y["loss"]) < 1e-4 for x, y in zip(s1, s2, strict=True))
    assert [(g["step"], g["to"]) for g in records(tmp_path / "two", "grow")] == [(5, 3), (10, 6)]
    assert json.loads((tmp_path / "two/summary.json").read_text())["processes"] == 2


def test_a_killed_two_process_run_resumes_bit_identical(tmp_path):
    args = ("--preset", "gpt-tiny", "--batch-size", "4", "--checkpoint-every", "4", "--dropout", "0.1")
    ref = run(tmp_path / "ref", *args, procs=2)
    assert ref.returncode == 0, ref.stderr[-3000:]
    killed = run(tmp_path / "run", *args, procs=2, killer=("step", "9"))  # both ranks die at step 9
    assert killed.returncode != 0 and not (tmp_path / "run/model").exists()
    resumed = run(None, "--resume", str(tmp_path / "run"), procs=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = load_file(tmp_path / "ref/model/model.safetensors"), load_file(tmp_path / "run/model/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in records(tmp_path / "run", "resume")] == [8]
    one = run(None, "--resume", str(tmp_path / "run"))
    assert one.returncode == 2 and "already finished" in one.stderr


def test_global_batch_sets_gradient_accumulation():
    assert grad_accum(TrainConfig(batch_size=32, global_batch=768), world=1) == 24
    assert grad_accum(TrainConfig(batch_size=32, global_batch=768), world=4) == 6
    assert grad_accum(TrainConfig(batch_size=8, grad_accum=3)) == 3
    with pytest.raises(ValueError, match="not a multiple"):
        grad_accum(TrainConfig(batch_size=32, global_batch=500), world=2)


def test_bf16_autocast_and_compiled_layers_train_close_to_fp32(tmp_path):
    ref = run(tmp_path / "fp32", "--preset", "gpt-tiny", "--batch-size", "8")
    bf16 = run(tmp_path / "bf16", "--preset", "gpt-tiny", "--batch-size", "8", "--precision", "bf16")
    assert ref.returncode == 0 and bf16.returncode == 0, bf16.stderr
    l32, l16 = records(tmp_path / "fp32", "step"), records(tmp_path / "bf16", "step")
    assert all(abs(x["loss"] - y["loss"]) < 0.05 for x, y in zip(l32, l16, strict=True))
    assert l16[0]["loss"] != l32[0]["loss"]  # autocast really ran in bf16
    w = load_file(tmp_path / "bf16/model/model.safetensors")
    assert all(t.dtype == torch.float32 for t in w.values())  # weights stay fp32

    comp = run(tmp_path / "compiled", "--preset", "gpt-tiny", "--batch-size", "8", "--compile")
    assert comp.returncode == 0, comp.stderr[-3000:]
    lc = records(tmp_path / "compiled", "step")
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(l32, lc, strict=True)) < 1e-4  # through both growths
