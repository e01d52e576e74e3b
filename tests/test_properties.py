"""Property-based checks (hypothesis) of the layer maps and depth samplers over all valid (N, d, L)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from apollo.config import ApolloError
from apollo.method.growth import interpolation_map, layer_map, stacking_map
from apollo.method.sampling import SAMPLERS, depth_distribution, sample_depths


@st.composite
def live_and_depth(draw, max_depth: int = 64):
    depth = draw(st.integers(1, max_depth))
    return draw(st.integers(1, depth)), depth


@given(live_and_depth())
def test_interpolation_map_uses_every_live_layer_in_one_ordered_block(nd):
    n, d = nd
    m = interpolation_map(n, d)
    assert len(m) == d and m == sorted(m) and set(m) == set(range(n))  # Eq. 12: order kept, nothing unused
    sizes = [m.count(i) for i in range(n)]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == d  # blocks as even as the division allows
    assert layer_map("interpolation", n, d) == m


@given(live_and_depth())
def test_stacking_map_repeats_the_stack_then_takes_the_top_layers(nd):
    n, d = nd
    m = stacking_map(n, d)
    full, rest = divmod(d, n)
    assert len(m) == d and set(m) <= set(range(n))
    assert m[: full * n] == list(range(n)) * full  # Eq. 11: whole copies of the stack, bottom to top
    assert m[full * n :] == list(range(n - rest, n))  # a partial block is the top `rest` layers, in order
    assert set(m) == set(range(n))  # every live layer is used at every depth >= n
    assert layer_map("stacking", n, d) == m


@given(st.integers(-3, 70), st.integers(1, 64), st.sampled_from(["interpolation", "stacking"]))
def test_layer_map_refuses_impossible_shapes(n, d, kind):
    if 1 <= n <= d:
        assert len(layer_map(kind, n, d)) == d
    else:
        with pytest.raises(ApolloError):
            layer_map(kind, n, d)


@settings(deadline=None)
@given(live_and_depth(max_depth=48), st.sampled_from(SAMPLERS), st.integers(0, 2**31 - 1))
def test_samplers_draw_only_depths_the_analytic_density_allows(nd, sampler, seed):
    n, depth = nd
    dist = depth_distribution(sampler, n, depth)
    assert set(dist) == set(range(n, depth + 1))  # N_s <= d <= L
    assert sum(dist.values()) == pytest.approx(1.0, abs=1e-9) and min(dist.values()) >= -1e-12
    draws = sample_depths(sampler, n, depth, torch.Generator().manual_seed(seed), size=256)
    assert int(draws.min()) >= n and int(draws.max()) <= depth
    assert all(dist[int(d)] > 0 for d in draws.unique())
    if n == depth or sampler == "fs":
        assert set(draws.tolist()) == {depth}


@settings(deadline=None)
@given(live_and_depth(max_depth=48).filter(lambda nd: nd[0] < nd[1]))
def test_lvps_puts_more_mass_on_low_depths_than_uniform(nd):
    n, depth = nd
    mean = {s: sum(d * p for d, p in depth_distribution(s, n, depth).items()) for s in ("lvps", "us")}
    assert mean["lvps"] < mean["us"]  # "low-value prioritized": cheaper expected depth than uniform
