"""The training loop, top to bottom: one loop for Scratch, StackBERT, Apollo, bert2BERT and LiGO.

bert2BERT and LiGO differ only in where the model starts: grown from a trained small model (LiGO after
training its growth operator, whose steps are logged and counted first); then they train at full depth.

Per step: (at a stage boundary: grow + rebuild the optimizer) -> set the learning rate -> for each
micro-batch draw a depth, share the live layers across it, forward/backward, count its FLOPs ->
clip, step -> log. Every ``eval_every`` steps: validation loss at full depth L.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm
from transformers import AutoTokenizer

from . import checkpoint
from .bert2bert import bert2bert, load_small, small_dir, width_map
from .config import ApolloError, MethodConfig, RunConfig, TrainConfig, check, config_changes, save_yaml
from .data import Batches, LMData, load_lm_data, valid_batches
from .flops import train_flops
from .growth import grow, layer_map, shared_layers
from .ligo import LiGO, merge, operator_loss
from .methods import resolve_method
from .models import build_model, get_layers, lm_loss
from .sampling import DepthSampler
from .schedule import resolve_schedule


def make_optimizer(model: nn.Module, t: TrainConfig) -> torch.optim.AdamW:
    """AdamW with no weight decay on biases and LayerNorm weights (every parameter with < 2 dims).

    ``fused=True``: one kernel per step instead of a chain of foreach ops; on CPU it measured 3.5x faster
    than foreach (9 vs 32 ms for gpt-tiny), a fixed per-step cost that would not shrink with depth.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": t.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, fused=True)


def lr_at(step: int, total_steps: int, t: TrainConfig) -> float:
    """Linear warmup then cosine decay to ``lr * min_lr_ratio``, over the whole run (never restarted).

    A plain function of the step, not a scheduler object: the optimizer is rebuilt at every growth, and
    a scheduler bound to the old one would have to be rebuilt and fast-forwarded with it.
    """
    warmup = max(1, round(t.warmup * total_steps))
    if step < warmup:
        return t.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def total_steps(t: TrainConfig, seq_len: int, steps_per_epoch: int) -> int:
    """Optimizer steps of the run from --steps, else --tokens, else --epochs."""
    if t.steps:
        return t.steps
    if t.tokens:
        return max(1, math.ceil(t.tokens / (t.batch_size * t.grad_accum * seq_len)))
    return max(1, round(t.epochs * steps_per_epoch / t.grad_accum))


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[dict], positions: list[int], mlm: bool) -> float:
    """Mean loss per predicted token over the validation batches, running the layers at ``positions``."""
    model.eval()
    total, count = 0.0, 0
    with shared_layers(model, positions):
        for batch in batches:
            labels = batch["labels"] if mlm else batch["labels"][:, 1:]  # causal LMs predict from position 1
            n = int((labels != -100).sum())
            total += float(lm_loss(model, batch, mlm)) * n
            count += n
    model.train()
    return total / max(1, count)


def prepare_run_dir(out: Path, overwrite: bool) -> None:
    """Refuse to write into an earlier run unless asked to; never delete anything but that run's files."""
    if out.exists() and not out.is_dir():
        raise ApolloError(f"run directory {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ApolloError(f"run directory {out} already exists (use --overwrite to replace it)")
        if not (out / "config.yaml").exists():
            raise ApolloError(f"refusing to overwrite {out}: it does not look like an apollo run directory")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def head_tokens(batch: dict[str, torch.Tensor], mlm: bool) -> int:
    """Positions the LM head runs at: the masked ones for MLM (``lm_loss``), every position for a causal LM."""
    return int((batch["labels"] != -100).sum()) if mlm else batch["input_ids"].numel()


def check_tokenizer(tokenizer, small_model: str) -> None:
    """A grown model keeps the small model's embedding rows, so both must use the same vocabulary."""
    path = small_dir(small_model)
    try:
        small_vocab = AutoTokenizer.from_pretrained(path).get_vocab()
    except (OSError, ValueError):
        raise ApolloError(f"--small-model {small_model} has no tokenizer") from None
    if small_vocab != tokenizer.get_vocab():
        raise ApolloError(f"this run's tokenizer differs from the small model's; pass --tokenizer {path}")


def train_operator(op: LiGO, model: nn.Module, batches: Batches, method: MethodConfig, t: TrainConfig, mlm: bool,
                   state: dict, write: Callable[[dict], None]) -> None:
    """LiGO: train only the growth operator (AdamW, peak LR, no decay) for ``ligo_steps`` steps on the LM loss,
    one micro-batch each, then merge it into the model's plain weights. Its FLOPs, tokens and seconds count."""
    optimizer = torch.optim.AdamW(op.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, weight_decay=0.0)
    op_flops = op.flops()
    depth = len(get_layers(model))
    for k in range(method.ligo_steps):
        start = time.perf_counter()
        batch = batches.batch(k)
        loss = operator_loss(op, model, batch, mlm)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(op.parameters(), t.clip or math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens = batch["input_ids"].numel()
        state["flops"] += op_flops + train_flops(model.config, depth, tokens, batch["input_ids"].shape[1],
                                                 head_tokens(batch, mlm))
        state["tokens"] += tokens
        state["wall_s"] += time.perf_counter() - start
        write({"event": "operator_step", "step": k, "loss": loss.item(), "tokens": state["tokens"],
               "flops": state["flops"], "wall_s": round(state["wall_s"], 4)})
    merge(op, model)
    write({"event": "grow", "step": 0, "from": op.n_small, "to": op.n_large, "growth": "ligo",
           "operator_steps": method.ligo_steps, "operator_flops_per_step": op_flops})


GrowHook = Callable[[str, int, nn.Module, list[int]], None]


def _resume_point(cfg: RunConfig, allow_config_change: bool) -> tuple[checkpoint.Checkpoint, list[str]]:
    """The run's latest checkpoint, refused when its config differs in anything that changes the result."""
    ckpt = checkpoint.load(Path(cfg.out))
    if (Path(cfg.out) / "summary.json").exists():
        raise ApolloError(f"--resume {cfg.out}: the run has already finished (summary.json exists)")
    changes = config_changes(ckpt.config, cfg)
    if changes and not allow_config_change:
        raise ApolloError(f"--resume {cfg.out}: the config differs from the checkpoint's in {'; '.join(changes)} "
                          "(pass --allow-config-change to resume anyway)")
    return ckpt, changes


def _reopen_log(path: Path, offset: int) -> None:
    """Cut metrics.jsonl back to what it held at the checkpoint: the steps after it are trained again."""
    if not path.exists() or path.stat().st_size < offset:
        raise ApolloError(f"{path} is shorter than the checkpoint says; the run directory was modified")
    with open(path, "r+b") as f:
        f.truncate(offset)


def train(cfg: RunConfig, data: LMData | None = None, overwrite: bool = False, on_grow: GrowHook | None = None,
          resume: bool = False, allow_config_change: bool = False) -> dict:
    """Train one run into ``cfg.out``; returns the run summary (also written to summary.json).

    ``resume``: continue ``cfg.out`` from its latest checkpoint; the result is bit-identical to an uninterrupted
    run (same thread count). ``on_grow(when, step, model, positions)``, if given, is called with ``when="before"``
    just before and ``"after"`` just after each growth, ``positions`` being the full-depth layer map at that moment
    (used by the stability study to measure the model on both sides of an expansion; it must not change the model).
    """
    check(cfg)
    m, t = cfg.model, cfg.train
    method = resolve_method(cfg.method, m.layers)  # checked before any data is loaded or anything written
    out = Path(cfg.out)
    ckpt, changes = None, []
    if resume:
        ckpt, changes = _resume_point(dataclasses.replace(cfg, method=method), allow_config_change)
    # bert2BERT / LiGO start from a trained smaller model, checked (with its tokenizer) before anything is written.
    small = load_small(method.small_model, m) if method.small_model and ckpt is None else None
    if small is not None and not cfg.data.tokenizer and data is None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=small_dir(method.small_model)))
    if data is None:  # a resumed run packs its text with the checkpoint's tokenizer, not a retrained one
        data_cfg = dataclasses.replace(cfg.data, tokenizer=str(ckpt.path / "tokenizer")) if ckpt else cfg.data
        data = load_lm_data(data_cfg, m, t.seed)
    if small is not None:
        check_tokenizer(data.tokenizer, method.small_model)
    if ckpt is not None and checkpoint.fingerprint(data.train) != ckpt.state["data_fingerprint"] \
            and not allow_config_change:
        raise ApolloError(f"--resume {out}: the training data differs from the checkpoint's "
                          "(pass --allow-config-change to resume anyway)")
    if t.threads:
        torch.set_num_threads(t.threads)
    batches = Batches(data.train, t.batch_size, t.seed, data.tokenizer, data.mlm, cfg.data.mlm_probability)
    # Validation masks use a fixed seed, so runs with different training seeds score the same validation set.
    valid = valid_batches(data.valid, t.batch_size, data.tokenizer, data.mlm, cfg.data.mlm_probability, 0,
                          t.eval_blocks)
    steps = total_steps(t, m.seq_len, batches.steps_per_epoch)
    schedule = resolve_schedule(method.stages, method.switch, method.switch_unit, steps, batches.steps_per_epoch,
                                m.layers)
    cfg = dataclasses.replace(cfg, method=method)
    sampler = DepthSampler(method.sampler, m.layers, t.seed)
    if ckpt is None:
        prepare_run_dir(out, overwrite)
        if method.method == "bert2bert":
            model = bert2bert(small, m, method.width_init, method.new_layers, t.seed)
        else:
            model = build_model(m, schedule.stages[0], t.seed)
        state = {"flops": 0, "tokens": 0, "wall_s": 0.0, "val_loss": float("nan"), "skipped": 0}
        first, stage = 0, 0
    else:  # everything is read and checked before the run directory is touched
        model = build_model(m, ckpt.state["live_layers"], t.seed)
        checkpoint.load_weights(model, ckpt)
        state = dict(ckpt.state["counters"])
        first, stage = ckpt.step, ckpt.state["stage"]
        sampler.load_state_dict(ckpt.state["sampler"])
        checkpoint.remove_partial(out)
        _reopen_log(out / "metrics.jsonl", ckpt.state["log_offset"])
    save_yaml(cfg, out / "config.yaml")
    model.train()
    tokens_per_micro = t.batch_size * m.seq_len
    rewarm_steps = round(method.rewarm * steps)  # LR ramp after each growth (0 = none)
    with open(out / "metrics.jsonl", "a" if ckpt else "w", encoding="utf-8") as log, \
            tqdm(total=steps, initial=first, disable=not t.progress, desc=f"{method.method}", unit="step",
                 dynamic_ncols=True) as bar:
        def write(record: dict) -> None:
            log.write(json.dumps(record) + "\n")

        if ckpt is None:
            write({"event": "start", "source": data.source, "steps": steps, "schedule": dataclasses.asdict(schedule),
                   "train_blocks": len(data.train), "valid_blocks": len(data.valid)})
        else:
            write({"event": "resume", "step": first, "checkpoint": ckpt.path.name, "config_changes": changes})
            bar.write(f"[{method.method}] resumed {out} at step {first} from {ckpt.path.name}"
                      + (f"; config changes: {'; '.join(changes)}" if changes else ""))
        if method.method == "ligo" and ckpt is None:
            train_operator(LiGO(small, model, width_map(small.config, model.config, t.seed)), model, batches, method,
                           t, data.mlm, state, write)
        if small is not None:  # where the grown model starts: its validation loss before any model update
            state["val_loss"] = evaluate(model, valid, list(range(m.layers)), data.mlm)
            write({"event": "eval", "step": 0, "stage": 0, "live_layers": m.layers, "val_loss": state["val_loss"],
                   "tokens": state["tokens"], "flops": state["flops"], "wall_s": round(state["wall_s"], 4)})
            bar.write(f"[{method.method}] grown from {method.small_model}: val loss {state['val_loss']:.4f}")
        optimizer = make_optimizer(model, t)
        if ckpt is not None:
            optimizer.load_state_dict(ckpt.optimizer)
            checkpoint.restore_rng(ckpt.state)  # last: building the model reseeded torch
        for step in range(first, steps):
            start = time.perf_counter()
            if schedule.stage_at(step) != stage:
                stage = schedule.stage_at(step)
                n_old = len(get_layers(model))
                if on_grow:
                    on_grow("before", step, model, layer_map(method.growth, n_old, m.layers))
                optimizer, source = grow(model, optimizer, schedule.stages[stage], method.growth, method.moments,
                                         lambda mod: make_optimizer(mod, t), method.new_layers)
                write({"event": "grow", "step": step, "from": n_old, "to": schedule.stages[stage],
                       "growth": method.growth, "source": source, "moments": method.moments,
                       "new_layers": method.new_layers})
                if on_grow:
                    on_grow("after", step, model, layer_map(method.growth, schedule.stages[stage], m.layers))
                bar.write(f"[{method.method}] step {step}: grew {n_old} -> {schedule.stages[stage]} live layers "
                          f"({method.growth}, moments {method.moments}, {method.new_layers}); optimizer rebuilt")
            n_live = schedule.stages[stage]
            lr = lr_at(step, steps, t) * schedule.rewarm(step, rewarm_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            depths, loss_sum = [], 0.0
            for micro in range(t.grad_accum):
                depth = sampler(n_live)
                batch = batches.batch(step * t.grad_accum + micro)
                with shared_layers(model, layer_map(method.growth, n_live, depth)):
                    loss = lm_loss(model, batch, data.mlm)
                (loss / t.grad_accum).backward()
                depths.append(depth)
                loss_sum += loss.item()
                state["flops"] += train_flops(model.config, depth, tokens_per_micro, m.seq_len,
                                              head_tokens(batch, data.mlm))
            loss = loss_sum / t.grad_accum
            # The total norm is logged for every run (growth diagnostics); max_norm=inf only measures it.
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip or math.inf))
            finite = math.isfinite(loss) and math.isfinite(grad_norm)
            if finite:
                optimizer.step()
            elif state["skipped"] < t.skip_nonfinite:  # drop the step's gradients; the weights stay as they were
                state["skipped"] += 1
            else:  # stop before the bad gradients reach the weights; the last checkpoint stays the latest
                last = checkpoint.saved(out)
                where = f"resume from {last[-1]} with --resume {out}" if last else "no checkpoint was saved"
                raise ApolloError(f"loss {loss} (gradient norm {grad_norm}) at step {step}: stopped; {where}; "
                                  "lower --lr or allow bad steps with --skip-nonfinite N")
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - start
            state["wall_s"] += elapsed
            state["tokens"] += tokens_per_micro * t.grad_accum
            write({"event": "step", "step": step, "stage": stage, "live_layers": n_live, "depth": depths,
                   "loss": loss, "grad_norm": round(grad_norm, 5), "lr": lr, "tokens": state["tokens"],
                   "flops": state["flops"], "wall_s": round(state["wall_s"], 4),
                   **({} if finite else {"skipped": True})})
            if (step + 1) % max(1, t.eval_every) == 0 or step + 1 == steps:
                # Validation always runs all L positions; before the last stage, through the current map.
                state["val_loss"] = evaluate(model, valid, layer_map(method.growth, n_live, m.layers), data.mlm)
                write({"event": "eval", "step": step + 1, "stage": stage, "live_layers": n_live,
                       "val_loss": state["val_loss"], "tokens": state["tokens"], "flops": state["flops"],
                       "wall_s": round(state["wall_s"], 4)})
                log.flush()
            if t.checkpoint_every and (step + 1) % t.checkpoint_every == 0 and step + 1 < steps:
                log.flush()
                run_state = {"stage": stage, "live_layers": n_live, "counters": dict(state),
                             "sampler": sampler.state_dict(), **checkpoint.rng_state(), "log_offset": log.tell(),
                             "data_fingerprint": checkpoint.fingerprint(data.train)}
                path, size, seconds = checkpoint.save(out, step + 1, model, optimizer, run_state, cfg, data.tokenizer,
                                                      t.keep_checkpoints)
                write({"event": "checkpoint", "step": step + 1, "path": str(path.relative_to(out)), "bytes": size,
                       "save_s": round(seconds, 3)})
                log.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", val=f"{state['val_loss']:.3f}", stage=f"{stage}:{n_live}L",
                            d=depths[-1], tok_s=f"{tokens_per_micro * t.grad_accum / elapsed:.0f}", refresh=False)

        test_loss = None
        if data.test is not None:  # scored once, at the end, on every test block, through the full-depth map
            test = valid_batches(data.test, t.batch_size, data.tokenizer, data.mlm, cfg.data.mlm_probability, 0, 0)
            test_loss = evaluate(model, test, layer_map(method.growth, n_live, m.layers), data.mlm)
            write({"event": "test", "step": steps, "test_loss": test_loss, "blocks": len(data.test)})
    model.save_pretrained(out / "model")
    data.tokenizer.model_max_length = m.seq_len  # so users' tokenizer calls truncate to the position table
    data.tokenizer.save_pretrained(out / "model")
    summary = {"method": method.method, "steps": steps, "tokens": state["tokens"], "flops": state["flops"],
               "wall_s": round(state["wall_s"], 3), "tokens_per_s": round(state["tokens"] / max(state["wall_s"], 1e-9)),
               "final_val_loss": state["val_loss"], "test_loss": test_loss, "data": data.source,
               "layers": len(get_layers(model))}
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary
