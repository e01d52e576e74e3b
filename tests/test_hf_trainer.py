"""ApolloTrainer (transformers.Trainer) against apollo train: the same depths, FLOPs and losses; exact resume across
a growth; idle slots untouched; two gloo processes agree; the example script runs; unsupported setups refused."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback, TrainingArguments, default_data_collator

from apollo import ApolloConfig, ApolloTrainer
from apollo.config import ApolloError, DataConfig, MethodConfig, RunConfig, TrainConfig
from apollo.data import Batches, load_lm_data
from apollo.models import build_model, get_layers
from apollo.runtime.train import train
from tests.conftest import tiny_model_config

ROOT = Path(__file__).resolve().parents[1]
STEPS, ACCUM, BATCH = 12, 2, 4
METHOD = {"stages": (1, 3, 6), "switch": (4, 8), "switch_unit": "step"}  # growths at steps 4 and 8


def ours(tmp_path, arch: str, method: str, knobs: dict = METHOD):
    """apollo train at a constant LR (warmup 1 step = none, min_lr_ratio 1), the Trainer's 'constant' schedule."""
    t = TrainConfig(batch_size=BATCH, grad_accum=ACCUM, steps=STEPS, lr=2e-3, warmup=0.0, lr_schedule="wsd",
                    min_lr_ratio=1.0, eval_every=100, eval_blocks=8, progress=False)
    cfg = RunConfig(model=tiny_model_config(arch, layers=6), method=MethodConfig(method, **knobs), train=t,
                    data=DataConfig(synthetic_sentences=1200), out=str(tmp_path / f"ours-{arch}-{method}"))
    data = load_lm_data(cfg.data, cfg.model, 0)
    summary = train(cfg, data)
    steps = [r for r in map(json.loads, (Path(cfg.out) / "metrics.jsonl").read_text().splitlines())
             if r["event"] == "step"]
    return cfg, data, summary, steps


def rows(data, n_micro: int) -> list[dict]:
    """apollo's micro-batches, in its order, as single examples (the Trainer reads them sequentially)."""
    b = Batches(data.train, BATCH, 0, data.tokenizer, data.mlm, 0.15)
    return [{k: v[i] for k, v in b.batch(j).items()} for j in range(n_micro) for i in range(BATCH)]


def hf(cfg, data, out: Path, method: str, knobs: dict = METHOD, **kw) -> ApolloTrainer:
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUM,
                             max_steps=STEPS, learning_rate=2e-3, lr_scheduler_type="constant", warmup_steps=0,
                             weight_decay=0.01, max_grad_norm=1.0, train_sampling_strategy="sequential",
                             logging_steps=1, report_to="none", seed=0, use_cpu=True, disable_tqdm=True,
                             **{"save_strategy": "no", **kw})
    return ApolloTrainer(model=build_model(cfg.model, 6, 0), args=args, train_dataset=rows(data, STEPS * ACCUM),
                         data_collator=default_data_collator, apollo=ApolloConfig(method, **knobs))


def by_step(depths: list[tuple[int, int]]) -> list[list[int]]:
    out: dict[int, list[int]] = {}
    for step, d in depths:
        out.setdefault(step, []).append(d)
    return list(out.values())


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


ZERO = {"stages": (0, 6), "switch": (8,), "switch_unit": "step"}  # head only, then 6 fresh layers at step 8
MIDAS = {"stages": (2, 4, 6), "switch": (4, 8), "switch_unit": "step"}


@pytest.mark.parametrize("arch,method,knobs,grown", [
    ("gpt2", "apollo", METHOD, [(1, 3), (3, 6)]), ("bert", "apollo", METHOD, [(1, 3), (3, 6)]),
    ("gpt2", "apollo-plus", METHOD, [(1, 3), (3, 6)]), ("bert", "stackbert", METHOD, [(1, 3), (3, 6)]),
    ("gpt2", "zero-layer", ZERO, [(0, 6)]), ("bert", "midas", MIDAS, [(2, 4), (4, 6)])])
def test_trainer_draws_the_same_depths_counts_the_same_flops_and_tracks_the_loss(tmp_path, arch, method, knobs,
                                                                                  grown):
    cfg, data, summary, steps = ours(tmp_path, arch, method, knobs)
    trainer = hf(cfg, data, tmp_path / "hf", method, knobs)
    trainer.train()
    assert by_step(trainer.depths) == [s["depth"] for s in steps]
    assert {len(set(s["depth"])) for s in steps} != {1} or method != "apollo"  # LVPS really sampled
    assert trainer.state.total_flos == summary["flops"]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == STEPS
    assert max(abs(a - s["loss"]) for a, s in zip(losses, steps, strict=True)) < 1e-5  # stated tolerance
    grows = [h["apollo_grow"] for h in trainer.state.log_history if "apollo_grow" in h]
    assert [(g["from"], g["to"]) for g in grows] == grown
    final = load_file(Path(cfg.out) / "model" / "model.safetensors")
    mine = trainer.model.state_dict()
    assert max((final[k] - mine[k]).abs().max().item() for k in final) < 1e-5


@pytest.mark.parametrize("kill_at", [7, 8, 9])  # the step before, at and after the 3 -> 6 growth
def test_resume_from_checkpoint_around_a_growth_is_bit_identical(tmp_path, kill_at):
    cfg, data, _, _ = ours(tmp_path, "gpt2", "apollo")
    ref = hf(cfg, data, tmp_path / "ref", "apollo", save_strategy="steps", save_steps=1)
    ref.train()
    again = hf(cfg, data, tmp_path / "again", "apollo")
    again.train(resume_from_checkpoint=str(tmp_path / "ref" / f"checkpoint-{kill_at}"))
    a, b = weights(ref.model), weights(again.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert by_step(again.depths) == by_step(ref.depths)[kill_at:]


class SlotWatch(TrainerCallback):
    """At every optimizer step: no gradient in a slot that is not live, and the last slot's weights untouched."""

    def __init__(self, trainer: ApolloTrainer):
        self.trainer, self.seen = trainer, []
        self.last = [p.detach().clone() for p in get_layers(trainer.model)[-1].parameters()]

    def on_pre_optimizer_step(self, args, state, control, **kw):
        n = self.trainer.n_live
        slots = get_layers(self.trainer.model)
        assert all(p.grad is None for layer in list(slots)[n:] for p in layer.parameters())
        assert all(p.grad is not None for layer in list(slots)[:n] for p in layer.parameters())
        same = all(torch.equal(p, q) for p, q in zip(slots[-1].parameters(), self.last, strict=True))
        self.seen.append((state.global_step, n, same))


def test_idle_slots_get_no_gradient_and_keep_their_weights_until_they_grow(tmp_path):
    cfg, data, _, _ = ours(tmp_path, "bert", "apollo")
    trainer = hf(cfg, data, tmp_path / "hf", "apollo")
    watch = SlotWatch(trainer)
    trainer.add_callback(watch)
    trainer.train()
    assert [(s, n) for s, n, _ in watch.seen] == [(s, 1 if s < 4 else 3 if s < 8 else 6) for s in range(STEPS)]
    assert all(same for s, _, same in watch.seen if s < 8) and not watch.seen[-1][2]


def test_bf16_autocast_draws_the_same_depths_and_counts_the_same_flops(tmp_path):
    cfg, data, summary, steps = ours(tmp_path, "gpt2", "apollo")
    trainer = hf(cfg, data, tmp_path / "hf", "apollo", bf16=True)
    trainer.train()
    assert by_step(trainer.depths) == [s["depth"] for s in steps] and trainer.state.total_flos == summary["flops"]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert max(abs(a - s["loss"]) for a, s in zip(losses, steps, strict=True)) < 0.05  # bf16 vs fp32


@pytest.mark.parametrize("bad,match", [({"torch_compile": True}, "torch_compile"),
                                       ({"ddp_find_unused_parameters": False}, "find_unused_parameters")])
def test_unsupported_trainer_setups_are_refused_in_one_line(tmp_path, bad, match):
    cfg, data, _, _ = ours(tmp_path, "gpt2", "scratch")
    with pytest.raises(ApolloError, match=match):
        hf(cfg, data, tmp_path / "hf", "apollo", **bad)


def test_methods_that_need_a_small_model_are_refused(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    model = build_model(tiny_model_config("gpt2", layers=6), 6, 0)
    with pytest.raises(ApolloError, match="bert2bert"):
        ApolloTrainer(model=model, args=args, apollo=ApolloConfig("bert2bert", small_model="x"))


def test_example_script_and_two_gloo_processes_agree_after_growth(tmp_path):
    text = tmp_path / "train.txt"
    text.write_text("".join(f"the {w} dog runs to the {v} house and sees a {w} cat.\n"
                            for w in ("small", "old", "red", "big") for v in ("new", "blue", "far")) * 40)
    tiny = ["--data", str(text), "--steps", "12", "--layers", "4", "--hidden", "32", "--seq-len", "16",
            "--vocab", "300"]
    one = subprocess.run([sys.executable, "examples/hf_trainer.py", *tiny, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "trained apollo:" in one.stdout
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(ROOT / "tests" / "hf_ddp.py"), str(tmp_path / "two")],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    ranks = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] and ranks[0]["world"] == 2  # the same depths, growths and final weights
    assert [g[1] for g in ranks[0]["grows"]] == [3, 6] and len(set(d for _, d in ranks[0]["depths"])) > 2
