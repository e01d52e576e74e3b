import math

import pytest

from apollo.config import ApolloError, RunConfig, TrainConfig, check
from apollo.method.lr_schedule import lr_at


def lrs(total=100, **kw) -> list[float]:
    t = TrainConfig(lr=1.0, warmup=0.1, min_lr_ratio=0.1, steps=total, **kw)
    return [lr_at(s, total, t) for s in range(total)]


def test_cosine_is_the_default_and_unchanged():
    x = lrs()
    assert x[0] == pytest.approx(0.1) and x[9] == pytest.approx(1.0)
    assert x[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert x[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))


def test_wsd_warms_up_holds_the_peak_then_decays_linearly_to_the_floor():
    x = lrs(lr_schedule="wsd", decay_fraction=0.2)
    assert x[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert x[10:80] == [1.0] * 70  # constant until the last 20 steps
    assert x[80:] == pytest.approx([0.1 + 0.9 * (1 - (s - 79) / 20) for s in range(80, 100)])
    assert x[-1] == pytest.approx(0.1)


def test_wsd_one_minus_sqrt_shape():
    x = lrs(lr_schedule="wsd", decay_fraction=0.2, decay_shape="1-sqrt")
    assert x[79] == 1.0 and x[-1] == pytest.approx(0.1)
    assert x[84] == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(5 / 20)))
    assert x[84] < lrs(lr_schedule="wsd", decay_fraction=0.2)[84]  # 1-sqrt drops faster at first


def test_linear_decays_from_the_end_of_warmup():
    x = lrs(lr_schedule="linear")
    assert x[9] == pytest.approx(1.0)
    assert x[10:] == pytest.approx([0.1 + 0.9 * (1 - (s - 9) / 90) for s in range(10, 100)])
    assert all(b < a for a, b in zip(x[10:], x[11:], strict=False))


@pytest.mark.parametrize("kw, match", [({"lr_schedule": "step"}, "unknown --lr-schedule"),
                                       ({"decay_shape": "cubic"}, "unknown --decay-shape"),
                                       ({"decay_fraction": 0.0}, "--decay-fraction"),
                                       ({"decay_fraction": 0.99}, "--decay-fraction")])
def test_bad_schedule_values(kw, match):
    with pytest.raises(ApolloError, match=match):
        check(RunConfig(train=TrainConfig(steps=10, **kw)))
