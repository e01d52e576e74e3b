"""The learning-rate schedule: warmup, then cosine, WSD or linear decay, global over the whole run.

A plain function of the step, not a scheduler object: the optimizer is rebuilt at every growth, and a
scheduler bound to the old one would have to be rebuilt and fast-forwarded with it. Never restarted at growth.

* ``cosine``: linear warmup, then ``lr * (r + (1 - r) * (1 + cos(pi * p)) / 2)``, ``p`` the progress after warmup.
* ``wsd`` (warmup-stable-decay; Hu et al., MiniCPM 2024; Hägele et al. 2024): linear warmup, the peak LR held,
  then over the last ``decay_fraction`` of the run a decay to ``lr * r``: ``linear`` or ``1-sqrt``
  (``lr * (r + (1 - r) * (1 - sqrt(q)))``, ``q`` the progress through the decay; Hägele et al.'s best shape).
* ``linear``: linear warmup, then linear decay to ``lr * r`` over the rest of the run.

``r`` is ``min_lr_ratio``.
"""

from __future__ import annotations

import math

from ..config import TrainConfig


def lr_at(step: int, total_steps: int, t: TrainConfig) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of a ``total_steps`` run."""
    warmup = max(1, round(t.warmup * total_steps))
    if step < warmup:
        return t.lr * (step + 1) / warmup
    r = t.min_lr_ratio
    if t.lr_schedule == "cosine":
        progress = (step - warmup) / max(1, total_steps - warmup)
        return t.lr * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * progress)))
    decay_steps = total_steps - warmup if t.lr_schedule == "linear" else round(t.decay_fraction * total_steps)
    decay_start = max(warmup, total_steps - max(1, decay_steps))
    if step < decay_start:
        return t.lr
    # q = 1 at the last step, so the run ends exactly at lr * r
    q = (step - decay_start + 1) / max(1, total_steps - decay_start)
    shape = math.sqrt(q) if t.lr_schedule == "wsd" and t.decay_shape == "1-sqrt" else q
    return t.lr * (r + (1 - r) * (1 - shape))
