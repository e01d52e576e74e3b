"""Depth samplers: which depth ``d`` (``N_s <= d <= L``) one forward pass runs at.

LVPS is the paper's low-value-prioritized sampling (Eq. 7-10); ES, US, FS and "none" are the
ablations of Table 1 / Fig. 7. All draw from a dedicated ``torch.Generator`` that belongs to the
run state, so every data-parallel rank (same seed, same number of draws) gets the same depth.

Each sampler maps ``x ~ U(x_min, 1)`` to a real ``y``, clips ``y`` to ``[1, rho]`` (``rho = L / N_s``)
and returns ``d = floor(N_s * y)``. Mass below 1 lands on ``d = N_s``; mass above ``rho`` on ``d = L``.
"""

from __future__ import annotations

import math

import torch

from ..config import ApolloError

X_MIN = 1e-6
E = 0.6  # y at x = 1
B_OFFSET = 0.4  # y at x = x_min is rho + 0.4
ES_STEEPNESS = 20.0
SAMPLERS = ("lvps", "es", "us", "fs", "none")


def _check(sampler: str) -> None:
    if sampler not in SAMPLERS:
        raise ApolloError(f"unknown sampler {sampler!r} (choose from {', '.join(SAMPLERS)})")


def _ends(n_live: int, depth: int) -> tuple[float, float]:
    """``b`` (y at x_min) and ``e`` (y at 1) for ``rho = depth / n_live``."""
    return depth / n_live + B_OFFSET, E


def _lvps_coeffs(b: float, e: float) -> tuple[float, float]:
    """``(n, m)`` of Eq. 7-10: ``n = (b x_min - e) / (e - b)``, ``m = e (n + 1)``."""
    n = (b * X_MIN - e) / (e - b)
    return n, e * (n + 1)


def lvps_y(x: torch.Tensor, n_live: int, depth: int) -> torch.Tensor:
    """LVPS, Eq. 7-10: ``y = m / (x + n)``, a hyperbola from ``b`` at ``x_min`` down to ``e`` at 1.

    ``n = (b * x_min - e) / (e - b)``, ``m = e * (n + 1)``; the density of ``y`` is ``m / y^2``, so
    the low (cheap) depths get most of the mass ("low-value prioritized").
    """
    n, m = _lvps_coeffs(*_ends(n_live, depth))
    return m / (x + n)


def es_y(x: torch.Tensor, n_live: int, depth: int) -> torch.Tensor:
    """ES (edge sampling, Table 1): a logistic step ``y = (b - e) / (1 + exp(k (x - 1/2))) + e``, k = 20."""
    b, e = _ends(n_live, depth)
    return (b - e) / (1 + torch.exp(ES_STEEPNESS * (x - 0.5))) + e


_CURVES = {"lvps": lvps_y, "es": es_y}


def _inverse(sampler: str, y: float, n_live: int, depth: int) -> float:
    """The ``x`` at which the (decreasing) curve equals ``y``; used for the analytic distribution."""
    b, e = _ends(n_live, depth)
    if y >= b:
        return X_MIN
    if y <= e:
        return 1.0
    if sampler == "lvps":
        n, m = _lvps_coeffs(b, e)
        return m / y - n
    return 0.5 + math.log((b - e) / (y - e) - 1) / ES_STEEPNESS


def sample_depths(sampler: str, n_live: int, depth: int, generator: torch.Generator, size: int = 1) -> torch.Tensor:
    """``size`` depth draws for a stage with ``n_live`` live layers and target depth ``depth`` (L)."""
    _check(sampler)
    if sampler == "none" and n_live == 0:  # zero-layer stage: embeddings and head only
        return torch.zeros(size, dtype=torch.long)
    if not 1 <= n_live <= depth:
        raise ApolloError(f"live layers {n_live} must be in [1, {depth}]")
    if sampler == "fs":
        return torch.full((size,), depth, dtype=torch.long)
    if sampler == "none":
        return torch.full((size,), n_live, dtype=torch.long)
    if sampler == "us":
        return torch.randint(n_live, depth + 1, (size,), generator=generator)
    x = X_MIN + (1 - X_MIN) * torch.rand(size, generator=generator, dtype=torch.float64)
    y = _CURVES[sampler](x, n_live, depth).clamp(1.0, depth / n_live)
    return torch.floor(n_live * y + 1e-9).long().clamp(n_live, depth)


def depth_distribution(sampler: str, n_live: int, depth: int) -> dict[int, float]:
    """The analytic probability of each depth ``d`` in ``[n_live, depth]`` (for tests and FLOP budgets)."""
    _check(sampler)
    ds = range(n_live, depth + 1)
    if sampler == "fs" or n_live == depth:
        return {d: float(d == depth) for d in ds}
    if sampler == "none":
        return {d: float(d == n_live) for d in ds}
    if sampler == "us":
        return {d: 1 / len(ds) for d in ds}

    def at_least(d: int) -> float:  # P(floor(n_live * y) >= d) = P(y >= d / n_live) = P(x <= x(d / n_live))
        if d <= n_live:
            return 1.0
        return (_inverse(sampler, d / n_live, n_live, depth) - X_MIN) / (1 - X_MIN)

    return {d: at_least(d) - (at_least(d + 1) if d < depth else 0.0) for d in ds}


class DepthSampler:
    """A seeded depth sampler: draw ``i`` of a run is a function of (seed, i) alone.

    ``draw(n_live, i)`` continues the generator when ``i`` is the next index, and otherwise replays the stream
    from the seed up to ``i`` in one vectorised call. That is exact because every sampler consumes one number per
    draw whatever ``n_live`` is (a float64 for LVPS / ES, one integer for US; FS and none consume nothing), so a
    resumed run, another rank or a ``transformers.Trainer`` that restarts at a step (``runtime/hf_trainer.py``) draws
    the same depths as an uninterrupted ``apollo train`` with no sampler state of its own.
    """

    def __init__(self, sampler: str, depth: int, seed: int):
        _check(sampler)
        self.sampler, self.depth, self.seed = sampler, depth, seed
        self.generator = torch.Generator().manual_seed(seed)
        self.drawn = 0  # draws taken from the generator so far

    def __call__(self, n_live: int) -> int:
        self.drawn += 1
        return int(sample_depths(self.sampler, n_live, self.depth, self.generator)[0])

    def draw(self, n_live: int, index: int) -> int:
        """The depth of draw ``index`` (0-based) of the run, at a stage with ``n_live`` live layers."""
        if index != self.drawn:
            self.generator.manual_seed(self.seed)
            if index > 0:
                sample_depths(self.sampler, n_live, self.depth, self.generator, size=index)
            self.drawn = index
        return self(n_live)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.drawn = state.get("drawn", -1)  # an older checkpoint: unknown, so the next draw() replays
