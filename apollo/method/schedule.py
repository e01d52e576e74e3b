"""The stage schedule: how many live layers train when, with switch points in steps, epochs or fractions.

The paper trains 1 -> 3 -> 6 -> 12 live layers, switching at epochs 2, 4 and 10 of 40; as fractions of
the run that is 0.05, 0.10, 0.25 (stage lengths 5% / 5% / 15% / 75%), which keeps the proportions on
short runs.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from ..config import ApolloError

UNITS = ("fraction", "step", "epoch")


@dataclass(frozen=True)
class Schedule:
    stages: tuple[int, ...]  # live layers per stage
    starts: tuple[int, ...]  # first step of each stage; starts[0] == 0

    def stage_at(self, step: int) -> int:
        """Index of the stage that ``step`` trains in."""
        return bisect.bisect_right(self.starts, step) - 1

    def rewarm(self, step: int, ramp_steps: int) -> float:
        """LR factor after a growth (apollo-plus): linear from 1/ramp to 1 over ``ramp_steps`` steps.

        Fresh copies (and reset or zeroed moments) meet the full LR at once otherwise; 1 in the first stage.
        """
        since = step - self.starts[self.stage_at(step)]
        if self.stage_at(step) == 0 or ramp_steps <= 0 or since >= ramp_steps:
            return 1.0
        return (since + 1) / ramp_steps


def check_stages(stages: tuple[int, ...], switch: tuple[float, ...], unit: str, depth: int) -> None:
    """The checks that need no run length: stages increasing from >= 1 to the depth (or from 0 before a later
    stage: zero-layer expansion), one switch per boundary."""
    if not stages:
        raise ApolloError("stages must not be empty")
    if stages[0] < (0 if len(stages) > 1 else 1):
        raise ApolloError(f"stages must start at >= 1 live layer (0 only before a later stage), got {list(stages)}")
    if any(b <= a for a, b in zip(stages, stages[1:], strict=False)):
        raise ApolloError(f"stages must be strictly increasing, got {list(stages)}")
    if stages[-1] != depth:
        raise ApolloError(f"stages must end at the model depth {depth}, got {list(stages)}")
    if len(switch) != len(stages) - 1:
        raise ApolloError(f"{len(stages)} stages need {len(stages) - 1} switch points, got {len(switch)}")
    if unit not in UNITS:
        raise ApolloError(f"unknown switch unit {unit!r} (choose from {', '.join(UNITS)})")


def resolve_schedule(stages: tuple[int, ...], switch: tuple[float, ...], unit: str, total_steps: int,
                     steps_per_epoch: int, depth: int) -> Schedule:
    """Check the stages and convert switch points to steps."""
    check_stages(stages, switch, unit, depth)
    scale = {"fraction": total_steps, "step": 1, "epoch": steps_per_epoch}[unit]
    starts = tuple(round(s * scale) for s in switch)
    if any(s <= 0 or s >= total_steps for s in starts):
        raise ApolloError(f"switch points {list(switch)} ({unit}) must fall inside the run of {total_steps} steps")
    if any(b <= a for a, b in zip(starts, starts[1:], strict=False)):
        raise ApolloError(f"switch points {list(switch)} ({unit}) must be strictly increasing in steps")
    return Schedule(tuple(stages), (0, *starts))
