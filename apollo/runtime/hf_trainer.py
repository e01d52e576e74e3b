"""``ApolloTrainer``: a depth-growth method inside a user's own ``transformers.Trainer`` script.

One import and one argument change a Trainer script::

    trainer = ApolloTrainer(model=model, args=args, train_dataset=ds, apollo=ApolloConfig(method="apollo"))

Design (preallocated, so nothing the Trainer builds once goes stale): the model keeps all L layer slots from
step 0; the slots not yet live run in no forward pass, so their ``.grad`` stays ``None`` and AdamW neither steps
nor decays them. A growth copies weights **and** AdamW state in place between existing parameters
(``growth.grow_in_place``) at an optimizer-step boundary, so the Trainer's optimizer, LR scheduler and DDP
wrapper stay valid and a ``resume_from_checkpoint`` loads into the same shapes. The depth of micro-batch ``m``
of optimizer step ``s`` is draw ``s * accumulation + m`` of the run's seeded sampler (``DepthSampler.draw``), so
every rank and a resumed run draw the same depths with no extra state; the stage follows from the step.

The method itself is apollo's, not a copy: ``table.resolve_method`` (stages, switch points, sampler, growth
map, policies), ``schedule.resolve_schedule``, ``sampling.DepthSampler``, ``growth.layer_map`` /
``shared_layers``, ``models.lm_loss`` and ``flops.StepFlops`` are the ones ``apollo train`` runs.
``floating_point_ops`` returns the FLOPs of the depth actually executed, so ``state.total_flos`` is honest.
"""

from __future__ import annotations

import logging

from transformers import Trainer

from ..config import ApolloError, MethodConfig
from ..measure.flops import StepFlops
from ..method.growth import eval_map, grow_in_place, layer_map, shared_layers
from ..method.sampling import DepthSampler
from ..method.schedule import Schedule, resolve_schedule
from ..method.table import FROM_SMALL, resolve_method
from ..models import get_layers, is_masked, lm_loss

logger = logging.getLogger(__name__)

ApolloConfig = MethodConfig  # the method and its knobs, exactly as ``apollo train --method ...`` takes them


class ApolloTrainer(Trainer):
    """``transformers.Trainer`` that trains ``model`` with a depth-growth method (``apollo=ApolloConfig(...)``).

    Supported: gradient accumulation, ``save_steps`` checkpoints and ``resume_from_checkpoint``, evaluation
    (at full depth through the current layer map), ``report_to``, bf16, and ``torchrun`` / ``accelerate launch``
    data parallelism (DDP with ``find_unused_parameters``). Refused with one line: DeepSpeed, FSDP,
    ``torch_compile``, bert2bert / ligo (grow the model with ``apollo.baselines.bert2bert`` first and train it with
    ``method="scratch"``) and ``rewarm``.
    """

    def __init__(self, *args, apollo: MethodConfig | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._check_supported(apollo or ApolloConfig("apollo"))
        self.depth = len(get_layers(self.model))
        self.method = resolve_method(apollo or ApolloConfig("apollo"), self.depth)
        if self.method.rewarm > 0:  # a method's default (gstack) as well as an explicit one
            raise ApolloError(f"ApolloTrainer does not support rewarm ({self.method.method} uses "
                              f"{self.method.rewarm}; pass rewarm=0 to train without it)")
        self.mlm = is_masked(self.model.config.model_type)
        self.sampler = DepthSampler(self.method.sampler, self.depth, self.args.seed)
        self.step_flops = StepFlops(self.model.config)
        # compute_loss returns each micro-batch's mean loss; the Trainer divides by the accumulation steps,
        # which is apollo train's (loss / accum).backward().
        self.model_accepts_loss_kwargs = False
        self.schedule: Schedule | None = None
        self.stage = 0
        self._micro = (-1, 0)  # (optimizer step, micro-batches of it seen so far)
        self._last = (self.depth, 0)  # (depth, head tokens) of the latest training micro-batch
        self.depths: list[tuple[int, int]] = []  # (optimizer step, depth) of every training micro-batch

    def _check_supported(self, apollo: MethodConfig) -> None:
        a = self.args
        refused = [("DeepSpeed", self.is_deepspeed_enabled), ("FSDP", self.is_fsdp_enabled),
                   ("torch_compile", a.torch_compile), ("ddp_find_unused_parameters=False",
                                                        a.ddp_find_unused_parameters is False),
                   (f"method={apollo.method}", apollo.method in FROM_SMALL)]
        for what, bad in refused:
            if bad:
                raise ApolloError(f"ApolloTrainer does not support {what} (see docs/trainer.md)")

    @property
    def n_live(self) -> int:
        return self.schedule.stages[self.stage] if self.schedule else self.method.stages[0]

    def _begin(self) -> None:
        """Resolve the stage schedule over the run's optimizer steps; a resumed run starts in the stage of the
        step before the one it resumes at, so a growth due at that step happens now."""
        accum = self.args.gradient_accumulation_steps
        per_epoch = max(1, len(self.train_dataset) // (self.args.train_batch_size * self.args.world_size * accum)) \
            if hasattr(self.train_dataset, "__len__") else 1
        self.schedule = resolve_schedule(self.method.stages, self.method.switch, self.method.switch_unit,
                                         self.state.max_steps, per_epoch, self.depth)
        self.stage = self.schedule.stage_at(max(0, self.state.global_step - 1))

    def _grow_to(self, stage: int, step: int) -> None:
        n_old, n_new = self.n_live, self.schedule.stages[stage]
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wraps the torch optimizer
        source = grow_in_place(self.accelerator.unwrap_model(self.model), optimizer, n_old, n_new,
                               self.method.growth, self.method.moments, self.method.new_layers)
        self.stage = stage
        logger.info("apollo: step %d: grew %d -> %d live layers (%s, moments %s, %s; source %s)", step, n_old,
                    n_new, self.method.growth, self.method.moments, self.method.new_layers, source)
        self.state.log_history.append({"apollo_grow": {"from": n_old, "to": n_new, "source": source},
                                       "step": step})

    def training_step(self, model, inputs, num_items_in_batch=None):
        step = self.state.global_step
        if self.schedule is None:
            self._begin()
        if self.schedule.stage_at(step) != self.stage:  # the first micro-batch of a step: a growth boundary
            self._grow_to(self.schedule.stage_at(step), step)
        micro = self._micro[1] if self._micro[0] == step else 0
        self._micro = (step, micro + 1)
        depth = self.sampler.draw(self.n_live, step * self.args.gradient_accumulation_steps + micro)
        self._last = (depth, 0)
        self.depths.append((step, depth))
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        core = self.accelerator.unwrap_model(model)
        depth = self._last[0] if model.training else self.depth  # evaluation runs every position, like ours
        positions = layer_map(self.method.growth, self.n_live, depth) if model.training else \
            eval_map(self.method.growth, self.n_live, depth)
        with shared_layers(core, positions):
            if model.training and model is core and not return_outputs:
                loss = lm_loss(core, inputs, self.mlm)  # apollo's loss: an MLM head only at masked positions
                head = int((inputs["labels"] != -100).sum()) if self.mlm else inputs["input_ids"].numel()
                outputs = None
            else:  # DDP must see the forward; HF's own loss then runs the head at every position
                outputs = model(**inputs)
                loss, head = outputs.loss, inputs["input_ids"].numel()
        if model.training:
            self._last = (depth, head)
        return (loss, outputs) if return_outputs else loss

    def floating_point_ops(self, inputs) -> int:
        """Training FLOPs of the latest micro-batch at the depth it ran (apollo's formula / measurement)."""
        ids = inputs["input_ids"]
        depth, head = self._last
        return int(self.step_flops.train(depth, ids.numel(), ids.shape[1], head))

