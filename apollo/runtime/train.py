"""The training loop, top to bottom: one loop for Scratch, StackBERT, Apollo, bert2BERT and LiGO.

bert2BERT and LiGO differ only in where the model starts: grown from a trained small model (LiGO after
training its growth operator, whose steps are logged and counted first); then they train at full depth.

Per step: (at a stage boundary: grow + rebuild the optimizer) -> set the learning rate -> for each
micro-batch draw a depth, share the live layers across it, forward/backward, count its FLOPs ->
clip, step -> log. Every ``eval_every`` steps: validation loss at full depth L.

``train`` runs the phases in order, each a function below sharing one ``Run``: ``setup`` (everything before the
log opens) -> ``announce`` -> LiGO's ``grow_by_operator`` -> ``ready`` -> per step: ``grow_now`` at a stage boundary,
``train_step``, ``evaluate_now``, ``checkpoint_now`` -> ``conclude`` -> ``finish``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import IO

import torch
from torch import nn
from tqdm import tqdm
from transformers import AutoTokenizer

from ..baselines.bert2bert import bert2bert, load_small, small_dir, width_map
from ..baselines.ligo import LiGO, merge, operator_loss
from ..config import ApolloError, MethodConfig, ModelConfig, RunConfig, TrainConfig, check, config_changes, save_yaml
from ..data import Batches, LMData, load_lm_data, valid_batches
from ..measure.energy import EnergyMeter
from ..measure.flops import StepFlops, train_flops
from ..method.growth import eval_map, grow, layer_map, shared_layers
from ..method.lr_schedule import lr_at
from ..method.sampling import DepthSampler
from ..method.schedule import Schedule, resolve_schedule
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


def check_run_dir(out: Path, overwrite: bool) -> bool:
    """Refuse a run directory that is not ours to replace; returns whether it holds anything."""
    if out.exists() and not out.is_dir():
        raise ApolloError(f"run directory {out} exists and is not a directory")
    occupied = out.exists() and any(out.iterdir())
    if occupied:
        if not overwrite:
            raise ApolloError(f"run directory {out} already exists (use --overwrite to replace it)")
        if not (out / "config.yaml").exists():
            raise ApolloError(f"refusing to overwrite {out}: it does not look like an apollo run directory")
    return occupied


def prepare_run_dir(out: Path, overwrite: bool, d: distributed.Dist | None = None) -> None:
    """Refuse to write into an earlier run unless asked to; never delete anything but that run's files.
    Under torchrun every rank checks the folder as it found it (so all fail alike), then rank 0 changes it."""
    occupied = check_run_dir(out, overwrite)
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


@dataclasses.dataclass(eq=False)
class Run:
    """What the phases of one run share: built by ``setup``; ``train`` attaches the log, bar, trackers and energy
    meter as it opens them, ``ready`` the optimizer and the (DDP-wrapped) loss module."""
    cfg: RunConfig  # resolved: the model config read, the method's defaults filled in, the tokenizer chosen
    d: distributed.Dist
    accum: int  # micro-batches per optimizer step
    data: LMData
    fingerprint: str  # of the packed training data: stored in every checkpoint, checked on resume
    batches: Batches
    valid: list[dict]
    steps: int
    schedule: Schedule
    sampler: DepthSampler
    model: nn.Module
    state: dict  # the counters (flops, tokens, wall_s, val_loss, skipped; energy): checkpointed and resumed
    first: int  # the first optimizer step this process trains (> 0 on resume)
    stage: int
    ckpt: checkpoint.Checkpoint | None = None  # the checkpoint this process resumed from
    changes: list[str] = dataclasses.field(default_factory=list)  # config changes accepted on resume
    in_operator: bool = False  # resumed from a checkpoint written while LiGO trained its operator
    small: nn.Module | None = None  # bert2BERT / LiGO: the trained smaller model this one grows from
    on_grow: GrowHook | None = None
    on_backward: StepHook | None = None
    log: IO[str] = dataclasses.field(init=False)
    bar: tqdm = dataclasses.field(init=False)
    track: Trackers = dataclasses.field(init=False)
    energy: EnergyMeter = dataclasses.field(init=False)
    optimizer: torch.optim.Optimizer = dataclasses.field(init=False)
    wrapped: nn.Module = dataclasses.field(init=False)  # LMLoss over the model; DDP under torchrun
    step_flops: StepFlops = dataclasses.field(init=False)

    @property
    def method(self) -> MethodConfig:
        return self.cfg.method

    @property
    def m(self) -> ModelConfig:
        return self.cfg.model

    @property
    def t(self) -> TrainConfig:
        return self.cfg.train

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def n_live(self) -> int:
        """Live layers in the current stage."""
        return self.schedule.stages[self.stage]

    @property
    def tokens_per_micro(self) -> int:
        """Tokens of one global micro-batch: global, so FLOPs and tokens count every rank's work."""
        return self.t.batch_size * self.d.world * self.m.seq_len

    @property
    def rewarm_steps(self) -> int:
        """The LR ramp after each growth, in steps (0 = none)."""
        return round(self.method.rewarm * self.steps)

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.d.device.type, dtype=torch.bfloat16, enabled=self.t.precision == "bf16")

    def write(self, record: dict) -> None:
        self.log.write(json.dumps(record) + "\n")
        self.track(record)  # --report-to: TensorBoard / wandb / trackio get the same numbers

    def say(self, message: str) -> None:
        if self.d.main:
            self.bar.write(message)

    def wrap(self) -> nn.Module:
        """The loss module over the current parameters (DDP under torchrun): built again after every growth."""
        return distributed.wrap(LMLoss(self.model, self.data.mlm), self.d)

    def fresh(self) -> nn.ModuleList:
        """new_layers="random": the layers of the L-layer init Scratch starts from."""
        with torch.random.fork_rng(devices=[]):  # leaves the run's random stream where it was
            return get_layers(build_model(self.m, self.m.layers, self.t.seed)).to(self.d.device)


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


def _resolve(cfg: RunConfig, resume: bool, allow_config_change: bool
             ) -> tuple[RunConfig, distributed.Dist, int, checkpoint.Checkpoint | None, list[str]]:
    """The config checked and resolved, the process group joined, the micro-batches per step, and on resume the
    checkpoint to continue from: all before any data is loaded or anything written."""
    check(cfg)
    cfg = dataclasses.replace(cfg, model=resolve_model(cfg.model))  # --model-config: arch = its model_type
    m, t = cfg.model, cfg.train
    cfg = dataclasses.replace(cfg, method=resolve_method(cfg.method, m.layers))
    d = distributed.setup(t.device)
    check_fits(m, t, d.device)  # before any allocation: a run that cannot fit is one line, not minutes of work
    accum = grad_accum(t, d.world)
    ckpt, changes = None, []
    if resume:
        ckpt, changes = _resume_point(cfg, allow_config_change)
        if ckpt.state.get("world", 1) != d.world and not allow_config_change:
            raise ApolloError(f"--resume {Path(cfg.out)}: the checkpoint was written by {ckpt.state.get('world', 1)} "
                              f"process(es), this run has {d.world} (pass --allow-config-change to resume anyway)")
    return cfg, d, accum, ckpt, changes


def _load_data(cfg: RunConfig, data: LMData | None, ckpt: checkpoint.Checkpoint | None, small: nn.Module | None,
               d: distributed.Dist, allow_config_change: bool) -> tuple[RunConfig, LMData, str]:
    """The data (loaded unless given), its tokenizer checked against the small model's and its fingerprint against
    the checkpoint's and the other ranks'; returns the config with the tokenizer it used."""
    if small is not None and not cfg.data.tokenizer and data is None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=small_dir(cfg.method.small_model)))
    if data is None:  # a resumed run packs its text with the checkpoint's tokenizer, not a retrained one
        data_cfg = dataclasses.replace(cfg.data, tokenizer=str(ckpt.path / "tokenizer")) if ckpt else cfg.data
        data = load_lm_data(data_cfg, cfg.model, cfg.train.seed)
    if small is not None:
        check_tokenizer(data.tokenizer, cfg.method.small_model)
    fingerprint = checkpoint.fingerprint(data.train)  # once: checked here, stored in every checkpoint
    if ckpt is not None and fingerprint != ckpt.state["data_fingerprint"] and not allow_config_change:
        raise ApolloError(f"--resume {Path(cfg.out)}: the training data differs from the checkpoint's "
                          "(pass --allow-config-change to resume anyway)")
    distributed.check_same(d, int(fingerprint[:15], 16), "the packed training data")
    return cfg, data, fingerprint


def _start_model(cfg: RunConfig, d: distributed.Dist, ckpt: checkpoint.Checkpoint | None, in_operator: bool,
                 small: nn.Module | None, live: int, sampler: DepthSampler, overwrite: bool
                 ) -> tuple[nn.Module, dict, int, int]:
    """The model the loop starts from (``live`` layers; bert2BERT: grown from the small model), its counters,
    first step and stage; on resume rebuilt from the checkpoint, the sampler restored and the log cut back to it.
    The run directory is prepared only here, after everything was read and checked."""
    m, t, out = cfg.model, cfg.train, Path(cfg.out)
    if ckpt is None:
        prepare_run_dir(out, overwrite, d)
        if cfg.method.method == "bert2bert":
            model = bert2bert(small, m, cfg.method.width_init, cfg.method.new_layers, t.seed)
        else:
            model = build_model(m, live, t.seed)
        return model, {"flops": 0, "tokens": 0, "wall_s": 0.0, "val_loss": float("nan"), "skipped": 0}, 0, 0
    model = build_model(m, ckpt.state["live_layers"], t.seed)
    if not in_operator:  # an operator checkpoint holds the operator and the models it maps between
        checkpoint.load_weights(model, ckpt)
    state = dict(ckpt.state["counters"])
    sampler.load_state_dict(ckpt.state["sampler"])
    if d.main:
        checkpoint.remove_partial(out)
        _reopen_log(out / "metrics.jsonl", ckpt.state["log_offset"])
    return model, state, ckpt.step, ckpt.state["stage"]


def setup(cfg: RunConfig, data: LMData | None, overwrite: bool, resume: bool, allow_config_change: bool,
          on_grow: GrowHook | None = None, on_backward: StepHook | None = None) -> Run:
    """Everything before the log opens: config, resume point, small model, data, schedule, run directory, model.
    Every check that can refuse the run comes before the run directory is touched."""
    cfg, d, accum, ckpt, changes = _resolve(cfg, resume, allow_config_change)
    method, m, t = cfg.method, cfg.model, cfg.train
    # bert2BERT / LiGO start from a trained smaller model, checked (with its tokenizer) before anything is written.
    in_operator = ckpt is not None and "operator_step" in ckpt.state  # killed while LiGO trained its operator
    small = load_small(method.small_model, m) if method.small_model and (ckpt is None or in_operator) else None
    cfg, data, fingerprint = _load_data(cfg, data, ckpt, small, d, allow_config_change)
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
    sampler = DepthSampler(method.sampler, m.layers, t.seed)
    model, state, first, stage = _start_model(cfg, d, ckpt, in_operator, small, schedule.stages[0], sampler,
                                              overwrite)
    if d.main:
        save_yaml(cfg, Path(cfg.out) / "config.yaml")
    distributed.barrier(d)  # the run directory is ready before any rank goes on
    model.train()
    return Run(cfg, d, accum, data, fingerprint, batches, valid, steps, schedule, sampler, model, state, first, stage,
               ckpt, changes, in_operator, small, on_grow, on_backward)


def announce(run: Run) -> None:
    """The log's first record of this process: the run's start, or where it resumed and from which checkpoint."""
    if run.ckpt is None:
        run.write({"event": "start", "source": run.data.source, "steps": run.steps,
                   "schedule": dataclasses.asdict(run.schedule), "train_blocks": len(run.data.train),
                   "valid_blocks": len(run.data.valid)})
    else:
        run.write({"event": "resume", "step": run.first, "checkpoint": run.ckpt.path.name,
                   "config_changes": run.changes})
        run.say(f"[{run.method.method}] resumed {run.out} at step {run.first} from {run.ckpt.path.name}"
                + (f"; config changes: {'; '.join(run.changes)}" if run.changes else ""))


def _checkpoint_state(run: Run, stage: int, live: int, **extra) -> dict:
    """What a checkpoint needs besides weights and optimizer to continue bit-identically; flush the log first."""
    return {"stage": stage, "live_layers": live, "counters": dict(run.state), **extra,
            "sampler": run.sampler.state_dict(), **checkpoint.rng_state(), "log_offset": run.log.tell(),
            "data_fingerprint": run.fingerprint, "world": run.d.world}


def grow_by_operator(run: Run) -> None:
    """LiGO's first phase: train the growth operator from the small model to this one, then merge it into the
    model's weights; its steps count (FLOPs, tokens, energy) and checkpoint every --checkpoint-every."""
    def save_operator(k: int, op: LiGO, op_optimizer: torch.optim.Optimizer) -> None:
        if not run.d.main:
            return
        run.energy.pause()  # resumed below: the operator's steps count, its checkpoint writes do not
        run.log.flush()
        state = _checkpoint_state(run, 0, run.m.layers, operator_step=k)
        path, size, seconds = checkpoint.save(run.out, 0, op, op_optimizer, state, run.cfg, run.data.tokenizer,
                                              run.t.keep_checkpoints)
        run.write({"event": "checkpoint", "step": 0, "operator_step": k, "path": str(path.relative_to(run.out)),
                   "bytes": size, "save_s": round(seconds, 3)})
        run.log.flush()
        run.energy.resume()

    run.energy.resume()
    op = LiGO(run.small, run.model, width_map(run.small.config, run.model.config, run.t.seed))
    train_operator(op, run.model, run.batches, run.method, run.t, run.data.mlm, run.state, run.write,
                   run.ckpt if run.in_operator else None, save_operator)


def _validate(run: Run, step: int, stage: int, live: int, positions: list[int]) -> None:
    """Log the validation loss at ``positions`` as of ``step``; the energy meter pauses: its kWh count training."""
    run.energy.pause()
    run.state["val_loss"] = evaluate(run.model, run.valid, positions, run.data.mlm, run.autocast)
    run.write({"event": "eval", "step": step, "stage": stage, "live_layers": live, "val_loss": run.state["val_loss"],
               "tokens": run.state["tokens"], "flops": run.state["flops"], "wall_s": round(run.state["wall_s"], 4),
               **run.energy.fields()})


def ready(run: Run) -> None:
    """From the model to the first step: on the device, scored where it starts if grown from a small model, its
    optimizer (restored on resume, then the RNG restored last: building the model reseeded torch), compiled, wrapped."""
    m, t = run.m, run.t
    run.model.to(run.d.device)
    if run.small is not None:  # where the grown model starts: its validation loss before any model update
        _validate(run, 0, 0, m.layers, list(range(m.layers)))
        run.say(f"[{run.method.method}] grown from {run.method.small_model}: val loss {run.state['val_loss']:.4f}")
    run.optimizer = make_optimizer(run.model, t)
    if run.ckpt is not None and not run.in_operator:
        run.optimizer.load_state_dict(run.ckpt.optimizer)
        checkpoint.restore_rng(run.ckpt.state)  # last: building the model reseeded torch
    if t.compile:
        compile_layers(run.model)
    run.wrapped = run.wrap()
    run.step_flops = StepFlops(run.model.config)  # measures an unregistered architecture once, not every step
    check_all_used(run.method.growth, len(get_layers(run.model)), m.layers)


def grow_now(run: Run, step: int) -> None:
    """The growth at a stage boundary: ``on_grow`` sees the model on both sides; ``grow`` rebuilds the optimizer
    (moments per --moments); the new layers are compiled and DDP rebuilt over the new parameters on every rank."""
    method, m, t = run.method, run.m, run.t
    run.stage = run.schedule.stage_at(step)
    n_old, n_new = len(get_layers(run.model)), run.n_live
    if run.on_grow:
        run.on_grow("before", step, run.model, eval_map(method.growth, n_old, m.layers))
    run.optimizer, source = grow(run.model, run.optimizer, n_new, method.growth, method.moments,
                                 lambda mod: make_optimizer(mod, t), method.new_layers, fresh=run.fresh)
    run.write({"event": "grow", "step": step, "from": n_old, "to": n_new, "growth": method.growth, "source": source,
               "moments": method.moments, "new_layers": method.new_layers})
    if t.compile:
        compile_layers(run.model)
    run.wrapped = run.wrap()  # DDP over the new parameters, every rank
    check_all_used(method.growth, n_new, m.layers)
    if t.check_ranks:
        distributed.check_same(run.d, distributed.weights_digest(run.model), f"the weights grown at step {step}")
    if run.on_grow:
        run.on_grow("after", step, run.model, layer_map(method.growth, n_new, m.layers))
    run.say(f"[{method.method}] step {step}: grew {n_old} -> {n_new} live layers "
            f"({method.growth}, moments {method.moments}, {method.new_layers}); optimizer "
            f"{'and DDP ' if run.d.active else ''}rebuilt")


def _forward_backward(run: Run, step: int) -> tuple[float, list[int]]:
    """Every micro-batch of ``step``: draw a depth, share the live layers across it, forward/backward (DDP syncs at
    the last one only), count its FLOPs. Returns the step's mean loss and the depths drawn."""
    d, t, mlm, accum = run.d, run.t, run.data.mlm, run.accum
    depths, loss_sum = [], 0.0
    for micro in range(accum):
        depth = run.sampler.draw(run.n_live, step * accum + micro)
        if t.check_ranks:
            distributed.check_same(d, depth, f"the depth drawn at step {step}")
        full = run.batches.batch(step * accum + micro)
        batch = {k: v[d.rank * t.batch_size:(d.rank + 1) * t.batch_size].to(d.device) for k, v in full.items()}
        last = micro == accum - 1
        with run.wrapped.no_sync() if d.active and not last else contextlib.nullcontext():
            with shared_layers(run.model, layer_map(run.method.growth, run.n_live, depth)), run.autocast():
                loss = run.wrapped(batch)
            head = head_tokens(batch, mlm)
            if d.active:  # weight by this rank's share of predicted tokens: the gradient of the global mean
                n = predicted_tokens(batch, mlm)
                n_all, loss_all, head = distributed.all_sum(d, [n, loss.item() * n, head])
                ((loss * (n * d.world / n_all)) / accum).backward()
                loss_sum += loss_all / n_all
            else:
                (loss / accum).backward()
                loss_sum += loss.item()
        depths.append(depth)
        run.state["flops"] += run.step_flops.train(depth, run.tokens_per_micro, run.m.seq_len, int(head))
    return loss_sum / accum, depths


def train_step(run: Run, step: int, start: float) -> tuple[float, int, float]:
    """One optimizer step begun at ``start`` (a growth at this step counts in its time): LR, micro-batches,
    ``on_backward``, clip, then step, skip or stop on a non-finite loss, log. Returns (loss, last depth, seconds)."""
    t, state = run.t, run.state
    lr = lr_at(step, run.steps, t) * run.schedule.rewarm(step, run.rewarm_steps)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    loss, depths = _forward_backward(run, step)
    # Norms are logged for every run (growth diagnostics); max_norm=inf only measures the total.
    if run.on_backward:
        run.on_backward(step, run.model)
    layer_norms = layer_grad_norms(run.model)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(run.model.parameters(), t.clip or math.inf))
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    if finite:
        run.optimizer.step()
    elif state["skipped"] < t.skip_nonfinite:  # drop the step's gradients; the weights stay as they were
        state["skipped"] += 1
    else:  # stop before the bad gradients reach the weights; the last checkpoint stays the latest
        last = checkpoint.saved(run.out)
        where = f"resume from {last[-1]} with --resume {run.out}" if last else "no checkpoint was saved"
        raise ApolloError(f"loss {loss} (gradient norm {grad_norm}) at step {step}: stopped; {where}; "
                          "lower --lr or allow bad steps with --skip-nonfinite N")
    run.optimizer.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - start
    state["wall_s"] += elapsed
    state["tokens"] += run.tokens_per_micro * run.accum
    run.write({"event": "step", "step": step, "stage": run.stage, "live_layers": run.n_live, "depth": depths,
               "loss": loss, "grad_norm": round(grad_norm, 5), "layer_grad_norm": layer_norms, "lr": lr,
               "tokens": state["tokens"], "flops": state["flops"], "wall_s": round(state["wall_s"], 4),
               **({} if finite else {"skipped": True})})
    return loss, depths[-1], elapsed


def evaluate_now(run: Run, step: int) -> None:
    """Validation loss after ``step`` (rank 0), always at all L positions: before the last stage, through the
    current map. The log is flushed, so a reader sees each validation as it happens."""
    _validate(run, step + 1, run.stage, run.n_live, eval_map(run.method.growth, run.n_live, run.m.layers))
    run.log.flush()


def checkpoint_now(run: Run, step: int, preempted: bool) -> None:
    """Checkpoint after ``step`` (rank 0, not timed as training): weights, optimizer, counters, sampler, RNG and
    the log's length, flushed first, so that a resumed run continues bit-identically."""
    run.energy.pause()
    run.log.flush()
    state = _checkpoint_state(run, run.stage, run.n_live)
    path, size, seconds = checkpoint.save(run.out, step + 1, run.model, run.optimizer, state, run.cfg,
                                          run.data.tokenizer, run.t.keep_checkpoints)
    run.write({"event": "checkpoint", "step": step + 1, "path": str(path.relative_to(run.out)), "bytes": size,
               "save_s": round(seconds, 3), **({"sigterm": True} if preempted else {})})
    run.log.flush()


def conclude(run: Run) -> float | None:
    """The end of training, while the log is open: every rank holds the same weights (--check-ranks); the test split
    is scored once (rank 0, every test block, the full-depth map). Returns the test loss, if any."""
    if run.t.check_ranks:
        distributed.check_same(run.d, distributed.weights_digest(run.model), "the final weights")
        run.write({"event": "rank_check", "step": run.steps, "ranks": run.d.world, "same_weights": True})
    if not run.d.main or run.data.test is None:
        return None
    data, t = run.data, run.t
    test = valid_batches(data.test, t.batch_size, data.tokenizer, data.mlm, run.cfg.data.mlm_probability, 0, 0)
    test_loss = evaluate(run.model, test, eval_map(run.method.growth, run.n_live, run.m.layers), data.mlm,
                         run.autocast)
    run.write({"event": "test", "step": run.steps, "test_loss": test_loss, "blocks": len(data.test)})
    return test_loss


def library_versions() -> dict[str, str]:
    """The libraries a run's losses depend on bit for bit (the same run under other versions differs in the last
    bits of its matmuls, and an unstable run by much more): recorded in summary.json."""
    return {name: version(name) for name in ("apollo", "torch", "transformers", "tokenizers")}


def finish(run: Run, test_loss: float | None) -> dict:
    """Once the log, trackers and energy meter are closed (its last stretch counted): the summary; rank 0 saves the
    model, its tokenizer and summary.json, which marks the run finished (``--resume`` refuses it)."""
    state, out = run.state, run.out
    summary = {"method": run.method.method, "steps": run.steps, "tokens": state["tokens"], "flops": state["flops"],
               "wall_s": round(state["wall_s"], 3), "tokens_per_s": round(state["tokens"] / max(state["wall_s"], 1e-9)),
               "final_val_loss": state["val_loss"], "test_loss": test_loss, "data": run.data.source,
               "layers": len(get_layers(run.model)), "processes": run.d.world, **run.energy.summary(),
               "versions": library_versions()}
    if run.d.main:
        run.model.save_pretrained(out / "model")
        run.data.tokenizer.model_max_length = run.m.seq_len  # so users' tokenizer calls truncate to the position table
        run.data.tokenizer.save_pretrained(out / "model")
        (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    distributed.barrier(run.d)
    return summary


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
    run = setup(cfg, data, overwrite, resume, allow_config_change, on_grow, on_backward)
    d, t, out, steps = run.d, run.t, run.out, run.steps
    log_path = out / "metrics.jsonl" if d.main else Path(os.devnull)  # only rank 0 writes
    with open(log_path, "a" if run.ckpt or not d.main else "w", encoding="utf-8") as run.log, \
            tqdm(total=steps, initial=run.first, disable=not t.progress or not d.main, desc=f"{run.method.method}",
                 unit="step", dynamic_ncols=True) as run.bar, sigterm_stops() as stop, \
            Trackers(t.report_to if d.main else (), out, run.cfg, run.first, run.ckpt is not None) as run.track, \
            EnergyMeter(t, out, run.state, d.main, run.first) as run.energy:  # training's kWh, paused for evaluation
        announce(run)
        if run.method.method == "ligo" and (run.ckpt is None or run.in_operator):
            grow_by_operator(run)
        ready(run)
        for step in range(run.first, steps):
            run.energy.resume()
            start = time.perf_counter()  # a growth at this step counts in the step's time and energy
            if run.schedule.stage_at(step) != run.stage:
                grow_now(run, step)
            loss, depth, elapsed = train_step(run, step, start)
            if d.main and ((step + 1) % max(1, t.eval_every) == 0 or step + 1 == steps):
                evaluate_now(run, step)
            preempted = stop.requested if not d.active else bool(distributed.all_sum(d, [int(stop.requested)])[0])
            due = t.checkpoint_every and (step + 1) % t.checkpoint_every == 0
            if d.main and (due or preempted) and step + 1 < steps:
                checkpoint_now(run, step, preempted)
            if preempted and step + 1 < steps:
                distributed.barrier(d)  # the checkpoint is complete before any rank exits
                raise Preempted(f"SIGTERM at step {step + 1}/{steps}: checkpoint written; continue with "
                                f"--resume {out}")
            run.bar.update(1)
            run.bar.set_postfix(loss=f"{loss:.3f}", val=f"{run.state['val_loss']:.3f}",
                                stage=f"{run.stage}:{run.n_live}L", d=depth,
                                tok_s=f"{run.tokens_per_micro * run.accum / elapsed:.0f}", refresh=False)
        test_loss = conclude(run)
    return finish(run, test_loss)
