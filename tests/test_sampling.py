import math

import pytest
import torch

from apollo.config import ApolloError
from apollo.method.sampling import SAMPLERS, DepthSampler, depth_distribution, sample_depths

DRAWS = 200_000


def draw(sampler, n_live, depth=12, seed=0, size=DRAWS):
    return sample_depths(sampler, n_live, depth, torch.Generator().manual_seed(seed), size)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("n_live", [1, 3, 6, 12])
def test_empirical_frequencies_match_analytic(sampler, n_live):
    d = draw(sampler, n_live)
    assert int(d.min()) >= n_live and int(d.max()) <= 12
    analytic = depth_distribution(sampler, n_live, 12)
    assert math.isclose(sum(analytic.values()), 1.0, abs_tol=1e-9)
    for k, p in analytic.items():
        emp = float((d == k).double().mean())
        tol = 5 * math.sqrt(p * (1 - p) / DRAWS) + 1e-4  # 5 standard errors
        assert abs(emp - p) <= tol, (sampler, n_live, k, emp, p)


@pytest.mark.parametrize(
    "n_live, probs, mean",
    [(1, {1: 0.735, 2: 0.105, 3: 0.052, 12: 0.0017}, 1.77), (3, {3: 0.637, 4: 0.103, 12: 0.016}, 4.23),
     (6, {6: 0.647, 12: 0.067}, 7.14)],
)
def test_lvps_matches_spec_reference_numbers(n_live, probs, mean):
    analytic = depth_distribution("lvps", n_live, 12)
    for k, p in probs.items():
        assert abs(analytic[k] - p) < 0.002, (k, analytic[k], p)
    assert abs(sum(k * p for k, p in analytic.items()) - mean) < 0.01
    assert abs(float(draw("lvps", n_live).double().mean()) - mean) < 0.02


def test_last_stage_and_fs_always_full_depth():
    for sampler in SAMPLERS:
        assert set(draw(sampler, 12, size=1000).tolist()) == {12}
    for n_live in (1, 3, 6):
        assert set(draw("fs", n_live, size=1000).tolist()) == {12}
        assert set(draw("none", n_live, size=1000).tolist()) == {n_live}


def test_es_puts_mass_on_both_edges():
    p = depth_distribution("es", 1, 12)
    assert p[1] > 0.35 and p[12] > 0.3 and max(p[k] for k in range(3, 11)) < 0.05


def test_lvps_prefers_low_depths():
    p = depth_distribution("lvps", 3, 12)
    assert all(p[k] >= p[k + 1] for k in range(3, 11))


def test_same_seed_same_sequence_and_state_roundtrip():
    a, b = DepthSampler("lvps", 12, seed=7), DepthSampler("lvps", 12, seed=7)
    seq_a = [a(3) for _ in range(500)]
    assert seq_a == [b(3) for _ in range(500)]
    assert seq_a != [DepthSampler("lvps", 12, seed=8)(3) for _ in range(500)]
    state = a.state_dict()
    nxt = [a(1) for _ in range(50)]
    a.load_state_dict(state)
    assert [a(1) for _ in range(50)] == nxt


def test_unknown_sampler_is_a_user_error():
    with pytest.raises(ApolloError, match="unknown sampler"):
        DepthSampler("lvsp", 12, 0)
    with pytest.raises(ApolloError):
        depth_distribution("nope", 1, 12)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_draw_by_index_equals_the_sequential_stream_across_stages(sampler):
    """draw(n_live, i) is draw i of the stream, whatever came before: a resumed run or a Trainer jumping to a step
    (even into a later stage) gets the depths an uninterrupted run drew."""
    stage = [1] * 30 + [3] * 30 + [6] * 40 + [12] * 20
    seq = DepthSampler(sampler, 12, seed=5)
    stream = [seq.draw(n, i) for i, n in enumerate(stage)]
    ref = DepthSampler(sampler, 12, seed=5)
    assert stream == [ref(n) for n in stage]
    jumper = DepthSampler(sampler, 12, seed=5)
    for i in [77, 3, 64, 65, 0, 119, 31]:
        assert jumper.draw(stage[i], i) == stream[i]
