"""The training loop, top to bottom: one loop for Scratch, StackBERT, Apollo, bert2BERT and LiGO.

bert2BERT and LiGO differ only in where the model starts: grown from a trained small model (LiGO after
training its growth operator, whose steps are logged and counted first); then they train at full depth.

Per step: (at a stage boundary: grow + rebuild the optimizer) -> set the learning rate -> for each
micro-batch draw a depth, share the live layers across it, forward/backward, count its FLOPs ->
clip, step -> log. Every ``eval_every`` steps: validation loss at full depth L.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm
from transformers import AutoTokenizer

from ..baselines.bert2bert import bert2bert, load_small, small_dir, width_map
from ..baselines.ligo import LiGO, merge, operator_loss
from ..config import ApolloError, MethodConfig, RunConfig, TrainConfig, check, config_changes, save_yaml
from ..data import Batches, LMData, load_lm_data, valid_batches
from ..measure.energy import EnergyMeter
from ..measure.flops import StepFlops, train_flops
from ..method.growth import eval_map, grow, layer_map, shared_layers
from ..method.lr_schedule import lr_at
from ..method.sampling import DepthSampler
from ..method.schedule import resolve_schedule
from ..method.table import resolve_method
from ..models import LMLoss, build_model, get_layers, lm_loss, resolve_model
from . import checkpoint, distributed
from .memory import check_fits
from .preempt import Preempted, sigterm_stops
from .trackers import Trackers


def make_optimizer(model: nn.Module, t: TrainConfig) -> torch.optim.AdamW:
    """AdamW with no weight decay on biases and LayerNorm weights (every parameter with < 2 dims).

    ``fused=True``: one kernel per step instead of a chain of foreach ops; on CPU it measured 3.5x faster
    than foreach (9 vs 32 ms for gpt-tiny), a fixed per-step cost that would not shrink with depth.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": t.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, fused=True)


def grad_accum(t: TrainConfig, world: int = 1) -> int:
    """Micro-batches per optimizer step: --grad-accum, or what --global-batch needs at this batch size and world."""
    if not t.global_batch:
        return t.grad_accum
    per = t.batch_size * world
    if t.global_batch % per:
        raise ApolloError(f"--global-batch {t.global_batch} is not a multiple of --batch-size {t.batch_size} x "
                          f"{world} process(es)")
    return t.global_batch // per


def total_steps(t: TrainConfig, seq_len: int, steps_per_epoch: int, world: int = 1) -> int:
    """Optimizer steps of the run from --steps, else --tokens, else --epochs (``steps_per_epoch`` counts global
    micro-batches)."""
    accum = grad_accum(t, world)
    if t.steps:
        return t.steps
    if t.tokens:
        return max(1, math.ceil(t.tokens / (t.batch_size * world * accum * seq_len)))
    return max(1, round(t.epochs * steps_per_epoch / accum))


def check_all_used(growth: str, n_live: int, depth: int) -> None:
    """Every live layer must run at every depth the sampler can draw (N_s..L): DDP would wait forever for the
    gradient of an unused one. True of every layer map (tests/test_properties.py); checked at each stage."""
    for d in range(max(1, n_live), depth + 1) if n_live else ():
        if set(layer_map(growth, n_live, d)) != set(range(n_live)):
            raise ApolloError(f"depth {d} leaves live layers unused under {growth} growth")


def compile_layers(model: nn.Module) -> None:
    """``torch.compile`` every live layer in place; called again after growth for the new copies."""
    for layer in get_layers(model):
        layer._compiled_call_impl = None  # a deep copy carries its source's compiled call; compile this module
        layer.compile()


@torch.no_grad()
def layer_grad_norms(model: nn.Module) -> list[float]:
    """The gradient norm of each live layer, before clipping, in layer order.

    A live weight that runs at k positions of a shared pass receives the sum of k gradients, so these show where
    a growth method's gradient spikes come from (0.0 for a layer with no gradient)."""
    norms = []
    for layer in get_layers(model):
        grads = [p.grad.detach().norm() for p in layer.parameters() if p.grad is not None]
        norms.append(round(float(torch.stack(grads).norm()), 5) if grads else 0.0)
    return norms


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[dict], positions: list[int], mlm: bool,
             autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> float:
    """Mean loss per predicted token over the validation batches, running the layers at ``positions``."""
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    with shared_layers(model, positions), autocast():
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            n = predicted_tokens(batch, mlm)
            total += float(lm_loss(model, batch, mlm)) * n
            count += n
    model.train()
    return total / max(1, count)


def prepare_run_dir(out: Path, overwrite: bool, d: distributed.Dist | None = None) -> None:
    """Refuse to write into an earlier run unless asked to; never delete anything but that run's files.
    Under torchrun every rank checks the folder as it found it (so all fail alike), then rank 0 changes it."""
    if out.exists() and not out.is_dir():
        raise ApolloError(f"run directory {out} exists and is not a directory")
    occupied = out.exists() and any(out.iterdir())
    if occupied:
        if not overwrite:
            raise ApolloError(f"run directory {out} already exists (use --overwrite to replace it)")
        if not (out / "config.yaml").exists():
            raise ApolloError(f"refusing to overwrite {out}: it does not look like an apollo run directory")
    if d is not None:
        distributed.barrier(d)
        if not d.main:
            return
    if occupied:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def predicted_tokens(batch: dict[str, torch.Tensor], mlm: bool) -> int:
    """Positions with a target: the masked ones for MLM; every position after the first for a causal LM."""
    labels = batch["labels"] if mlm else batch["labels"][:, 1:]
    return int((labels != -100).sum())


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
                   state: dict, write: Callable[[dict], None], resume: checkpoint.Checkpoint | None = None,
                   save: Callable[[int, LiGO, torch.optim.Optimizer], None] | None = None) -> None:
    """LiGO: train only the growth operator (AdamW, peak LR, no decay) for ``ligo_steps`` steps on the LM loss,
    one micro-batch each, then merge it into the model's plain weights. Its FLOPs, tokens and seconds count.
    ``save(k, op, optimizer)`` checkpoints after operator step k (every ``checkpoint_every``); ``resume``
    continues from such a checkpoint."""
    optimizer = torch.optim.AdamW(op.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, weight_decay=0.0)
    first = 0
    if resume is not None:
        checkpoint.load_weights(op, resume)
        optimizer.load_state_dict(resume.optimizer)
        checkpoint.restore_rng(resume.state)
        first = resume.state["operator_step"]
    op_flops = op.flops()
    depth = len(get_layers(model))
    for k in range(first, method.ligo_steps):
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
        if save and t.checkpoint_every and (k + 1) % t.checkpoint_every == 0 and k + 1 < method.ligo_steps:
            save(k + 1, op, optimizer)
    merge(op, model)
    write({"event": "grow", "step": 0, "from": op.n_small, "to": op.n_large, "growth": "ligo",
           "operator_steps": method.ligo_steps, "operator_flops_per_step": op_flops})


GrowHook = Callable[[str, int, nn.Module, list[int]], None]
StepHook = Callable[[int, nn.Module], None]


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
          resume: bool = False, allow_config_change: bool = False, on_backward: StepHook | None = None) -> dict:
    """Train one run into ``cfg.out``; returns the run summary (also written to summary.json).

    ``resume``: continue ``cfg.out`` from its latest checkpoint; the result is bit-identical to an uninterrupted
    run (same thread count). ``on_grow(when, step, model, positions)``, if given, is called with ``when="before"``
    just before and ``"after"`` just after each growth, ``positions`` being the full-depth layer map at that moment
    (used by the stability study to measure the model on both sides of an expansion; it must not change the model).
    ``on_backward(step, model)``, if given, is called once the step's gradients are complete, before clipping
    (the spike probe reads them there; it must not change the model or its gradients).
    """
    check(cfg)
    cfg = dataclasses.replace(cfg, model=resolve_model(cfg.model))  # --model-config: arch = its model_type
    m, t = cfg.model, cfg.train
    method = resolve_method(cfg.method, m.layers)  # checked before any data is loaded or anything written
    out = Path(cfg.out)
    d = distributed.setup(t.device)
    check_fits(m, t, d.device)  # before any allocation: a run that cannot fit is one line, not minutes of work
    accum = grad_accum(t, d.world)
    ckpt, changes = None, []
    if resume:
        ckpt, changes = _resume_point(dataclasses.replace(cfg, method=method), allow_config_change)
        if ckpt.state.get("world", 1) != d.world and not allow_config_change:
            raise ApolloError(f"--resume {out}: the checkpoint was written by {ckpt.state.get('world', 1)} "
                              f"process(es), this run has {d.world} (pass --allow-config-change to resume anyway)")
    # bert2BERT / LiGO start from a trained smaller model, checked (with its tokenizer) before anything is written.
    in_operator = ckpt is not None and "operator_step" in ckpt.state  # killed while LiGO trained its operator
    small = load_small(method.small_model, m) if method.small_model and (ckpt is None or in_operator) else None
    if small is not None and not cfg.data.tokenizer and data is None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=small_dir(method.small_model)))
    if data is None:  # a resumed run packs its text with the checkpoint's tokenizer, not a retrained one
        data_cfg = dataclasses.replace(cfg.data, tokenizer=str(ckpt.path / "tokenizer")) if ckpt else cfg.data
        data = load_lm_data(data_cfg, m, t.seed)
    if small is not None:
        check_tokenizer(data.tokenizer, method.small_model)
    data_fingerprint = checkpoint.fingerprint(data.train)  # once: checked here, stored in every checkpoint
    if ckpt is not None and data_fingerprint != ckpt.state["data_fingerprint"] and not allow_config_change:
        raise ApolloError(f"--resume {out}: the training data differs from the checkpoint's "
                          "(pass --allow-config-change to resume anyway)")
    distributed.check_same(d, int(data_fingerprint[:15], 16), "the packed training data")
    if t.threads:
        torch.set_num_threads(t.threads)
    # The global micro-batch: what one process with batch_size x world would read; rank r takes the r-th slice.
    batches = Batches(data.train, t.batch_size * d.world, t.seed, data.tokenizer, data.mlm, cfg.data.mlm_probability)
    # Validation masks use a fixed seed, so runs with different training seeds score the same validation set.
    valid = valid_batches(data.valid, t.batch_size, data.tokenizer, data.mlm, cfg.data.mlm_probability, 0,
                          t.eval_blocks)
    steps = total_steps(t, m.seq_len, batches.steps_per_epoch, d.world)
    schedule = resolve_schedule(method.stages, method.switch, method.switch_unit, steps, batches.steps_per_epoch,
                                m.layers)
    cfg = dataclasses.replace(cfg, method=method)
    sampler = DepthSampler(method.sampler, m.layers, t.seed)
    if ckpt is None:
        prepare_run_dir(out, overwrite, d)
        if method.method == "bert2bert":
            model = bert2bert(small, m, method.width_init, method.new_layers, t.seed)
        else:
            model = build_model(m, schedule.stages[0], t.seed)
        state = {"flops": 0, "tokens": 0, "wall_s": 0.0, "val_loss": float("nan"), "skipped": 0}
        first, stage = 0, 0
    else:  # everything is read and checked before the run directory is touched
        model = build_model(m, ckpt.state["live_layers"], t.seed)
        if not in_operator:  # an operator checkpoint holds the operator and the models it maps between
            checkpoint.load_weights(model, ckpt)
        state = dict(ckpt.state["counters"])
        first, stage = ckpt.step, ckpt.state["stage"]
        sampler.load_state_dict(ckpt.state["sampler"])
        if d.main:
            checkpoint.remove_partial(out)
            _reopen_log(out / "metrics.jsonl", ckpt.state["log_offset"])
    if d.main:
        save_yaml(cfg, out / "config.yaml")
    distributed.barrier(d)  # the run directory is ready before any rank goes on
    model.train()
    tokens_per_micro = t.batch_size * d.world * m.seq_len  # global, so FLOPs and tokens count every rank's work
    rewarm_steps = round(method.rewarm * steps)  # LR ramp after each growth (0 = none)
    autocast = functools.partial(torch.autocast, d.device.type, dtype=torch.bfloat16, enabled=t.precision == "bf16")
    log_path = out / "metrics.jsonl" if d.main else Path(os.devnull)  # only rank 0 writes
    with open(log_path, "a" if ckpt or not d.main else "w", encoding="utf-8") as log, \
            tqdm(total=steps, initial=first, disable=not t.progress or not d.main, desc=f"{method.method}",
                 unit="step", dynamic_ncols=True) as bar, sigterm_stops() as stop, \
            Trackers(t.report_to if d.main else (), out, cfg, first, ckpt is not None) as track, \
            EnergyMeter(t, out, state, d.main, first) as energy:  # the training steps' kWh, paused for evaluation
        def write(record: dict) -> None:
            log.write(json.dumps(record) + "\n")
            track(record)  # --report-to: TensorBoard / wandb / trackio get the same numbers

        def say(message: str) -> None:
            if d.main:
                bar.write(message)

        if ckpt is None:
            write({"event": "start", "source": data.source, "steps": steps, "schedule": dataclasses.asdict(schedule),
                   "train_blocks": len(data.train), "valid_blocks": len(data.valid)})
        else:
            write({"event": "resume", "step": first, "checkpoint": ckpt.path.name, "config_changes": changes})
            say(f"[{method.method}] resumed {out} at step {first} from {ckpt.path.name}"
                + (f"; config changes: {'; '.join(changes)}" if changes else ""))
        if method.method == "ligo" and (ckpt is None or in_operator):
            def save_operator(k: int, op: LiGO, op_optimizer: torch.optim.Optimizer) -> None:
                if not d.main:
                    return
                energy.pause()  # resumed below: the operator's steps count, its checkpoint writes do not
                log.flush()
                run_state = {"stage": 0, "live_layers": m.layers, "counters": dict(state), "operator_step": k,
                             "sampler": sampler.state_dict(), **checkpoint.rng_state(), "log_offset": log.tell(),
                             "data_fingerprint": data_fingerprint, "world": d.world}
                path, size, seconds = checkpoint.save(out, 0, op, op_optimizer, run_state, cfg, data.tokenizer,
                                                      t.keep_checkpoints)
                write({"event": "checkpoint", "step": 0, "operator_step": k, "path": str(path.relative_to(out)),
                       "bytes": size, "save_s": round(seconds, 3)})
                log.flush()
                energy.resume()

            energy.resume()
            train_operator(LiGO(small, model, width_map(small.config, model.config, t.seed)), model, batches, method,
                           t, data.mlm, state, write, ckpt if in_operator else None, save_operator)
        model.to(d.device)
        if small is not None:  # where the grown model starts: its validation loss before any model update
            energy.pause()
            state["val_loss"] = evaluate(model, valid, list(range(m.layers)), data.mlm, autocast)
            write({"event": "eval", "step": 0, "stage": 0, "live_layers": m.layers, "val_loss": state["val_loss"],
                   "tokens": state["tokens"], "flops": state["flops"], "wall_s": round(state["wall_s"], 4),
                   **energy.fields()})
            say(f"[{method.method}] grown from {method.small_model}: val loss {state['val_loss']:.4f}")
        optimizer = make_optimizer(model, t)
        if ckpt is not None and not in_operator:
            optimizer.load_state_dict(ckpt.optimizer)
            checkpoint.restore_rng(ckpt.state)  # last: building the model reseeded torch
        if t.compile:
            compile_layers(model)
        wrapped = distributed.wrap(LMLoss(model, data.mlm), d)
        step_flops = StepFlops(model.config)  # measures an unregistered architecture once, not every step

        def fresh() -> nn.ModuleList:  # new_layers="random": the layers of the L-layer init Scratch starts from
            with torch.random.fork_rng(devices=[]):  # leaves the run's random stream where it was
                return get_layers(build_model(m, m.layers, t.seed)).to(d.device)

        check_all_used(method.growth, len(get_layers(model)), m.layers)
        for step in range(first, steps):
            energy.resume()
            start = time.perf_counter()
            if schedule.stage_at(step) != stage:
                stage = schedule.stage_at(step)
                n_old = len(get_layers(model))
                if on_grow:
                    on_grow("before", step, model, eval_map(method.growth, n_old, m.layers))
                optimizer, source = grow(model, optimizer, schedule.stages[stage], method.growth, method.moments,
                                         lambda mod: make_optimizer(mod, t), method.new_layers, fresh=fresh)
                write({"event": "grow", "step": step, "from": n_old, "to": schedule.stages[stage],
                       "growth": method.growth, "source": source, "moments": method.moments,
                       "new_layers": method.new_layers})
                if t.compile:
                    compile_layers(model)
                wrapped = distributed.wrap(LMLoss(model, data.mlm), d)  # DDP over the new parameters, every rank
                check_all_used(method.growth, schedule.stages[stage], m.layers)
                if t.check_ranks:
                    distributed.check_same(d, distributed.weights_digest(model), f"the weights grown at step {step}")
                if on_grow:
                    on_grow("after", step, model, layer_map(method.growth, schedule.stages[stage], m.layers))
                say(f"[{method.method}] step {step}: grew {n_old} -> {schedule.stages[stage]} live layers "
                    f"({method.growth}, moments {method.moments}, {method.new_layers}); optimizer "
                    f"{'and DDP ' if d.active else ''}rebuilt")
            n_live = schedule.stages[stage]
            lr = lr_at(step, steps, t) * schedule.rewarm(step, rewarm_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            depths, loss_sum = [], 0.0
            for micro in range(accum):
                depth = sampler.draw(n_live, step * accum + micro)
                if t.check_ranks:
                    distributed.check_same(d, depth, f"the depth drawn at step {step}")
                full = batches.batch(step * accum + micro)
                batch = {k: v[d.rank * t.batch_size:(d.rank + 1) * t.batch_size].to(d.device) for k, v in full.items()}
                last = micro == accum - 1
                with wrapped.no_sync() if d.active and not last else contextlib.nullcontext():
                    with shared_layers(model, layer_map(method.growth, n_live, depth)), autocast():
                        loss = wrapped(batch)
                    head = head_tokens(batch, data.mlm)
                    if d.active:  # weight by this rank's share of predicted tokens: the gradient of the global mean
                        n = predicted_tokens(batch, data.mlm)
                        n_all, loss_all, head = distributed.all_sum(d, [n, loss.item() * n, head])
                        ((loss * (n * d.world / n_all)) / accum).backward()
                        loss_sum += loss_all / n_all
                    else:
                        (loss / accum).backward()
                        loss_sum += loss.item()
                depths.append(depth)
                state["flops"] += step_flops.train(depth, tokens_per_micro, m.seq_len, int(head))
            loss = loss_sum / accum
            # Norms are logged for every run (growth diagnostics); max_norm=inf only measures the total.
            if on_backward:
                on_backward(step, model)
            layer_norms = layer_grad_norms(model)
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
            state["tokens"] += tokens_per_micro * accum
            write({"event": "step", "step": step, "stage": stage, "live_layers": n_live, "depth": depths,
                   "loss": loss, "grad_norm": round(grad_norm, 5), "layer_grad_norm": layer_norms, "lr": lr,
                   "tokens": state["tokens"],
                   "flops": state["flops"], "wall_s": round(state["wall_s"], 4),
                   **({} if finite else {"skipped": True})})
            if d.main and ((step + 1) % max(1, t.eval_every) == 0 or step + 1 == steps):
                # Validation always runs all L positions; before the last stage, through the current map.
                energy.pause()
                state["val_loss"] = evaluate(model, valid, eval_map(method.growth, n_live, m.layers), data.mlm,
                                             autocast)
                write({"event": "eval", "step": step + 1, "stage": stage, "live_layers": n_live,
                       "val_loss": state["val_loss"], "tokens": state["tokens"], "flops": state["flops"],
                       "wall_s": round(state["wall_s"], 4), **energy.fields()})
                log.flush()
            preempted = stop.requested if not d.active else bool(distributed.all_sum(d, [int(stop.requested)])[0])
            due = t.checkpoint_every and (step + 1) % t.checkpoint_every == 0
            if d.main and (due or preempted) and step + 1 < steps:
                energy.pause()
                log.flush()
                run_state = {"stage": stage, "live_layers": n_live, "counters": dict(state),
                             "sampler": sampler.state_dict(), **checkpoint.rng_state(), "log_offset": log.tell(),
                             "data_fingerprint": data_fingerprint, "world": d.world}
                path, size, seconds = checkpoint.save(out, step + 1, model, optimizer, run_state, cfg, data.tokenizer,
                                                      t.keep_checkpoints)
                write({"event": "checkpoint", "step": step + 1, "path": str(path.relative_to(out)), "bytes": size,
                       "save_s": round(seconds, 3), **({"sigterm": True} if preempted else {})})
                log.flush()
            if preempted and step + 1 < steps:
                distributed.barrier(d)  # the checkpoint is complete before any rank exits
                raise Preempted(f"SIGTERM at step {step + 1}/{steps}: checkpoint written; continue with "
                                f"--resume {out}")
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", val=f"{state['val_loss']:.3f}", stage=f"{stage}:{n_live}L",
                            d=depths[-1], tok_s=f"{tokens_per_micro * accum / elapsed:.0f}", refresh=False)

        if t.check_ranks:
            distributed.check_same(d, distributed.weights_digest(model), "the final weights")
            write({"event": "rank_check", "step": steps, "ranks": d.world, "same_weights": True})
        test_loss = None
        if d.main and data.test is not None:  # scored once, at the end, on every test block, full-depth map
            test = valid_batches(data.test, t.batch_size, data.tokenizer, data.mlm, cfg.data.mlm_probability, 0, 0)
            test_loss = evaluate(model, test, eval_map(method.growth, n_live, m.layers), data.mlm, autocast)
            write({"event": "test", "step": steps, "test_loss": test_loss, "blocks": len(data.test)})
    summary = {"method": method.method, "steps": steps, "tokens": state["tokens"], "flops": state["flops"],
               "wall_s": round(state["wall_s"], 3), "tokens_per_s": round(state["tokens"] / max(state["wall_s"], 1e-9)),
               "final_val_loss": state["val_loss"], "test_loss": test_loss, "data": data.source,
               "layers": len(get_layers(model)), "processes": d.world, **energy.summary()}
    if d.main:
        model.save_pretrained(out / "model")
        data.tokenizer.model_max_length = m.seq_len  # so users' tokenizer calls truncate to the position table
        data.tokenizer.save_pretrained(out / "model")
        (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    distributed.barrier(d)
    return summary
