import pytest

from apollo.config import ApolloError, MethodConfig
from apollo.method.schedule import resolve_schedule
from apollo.method.table import resolve_method


def test_fractions_give_paper_proportions():
    s = resolve_schedule((1, 3, 6, 12), (0.05, 0.10, 0.25), "fraction", 400, 10, 12)
    assert s.starts == (0, 20, 40, 100)
    assert [s.stage_at(i) for i in (0, 19, 20, 39, 40, 99, 100, 399)] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_steps_and_epochs():
    assert resolve_schedule((3, 6, 12), (5, 9), "step", 20, 4, 12).starts == (0, 5, 9)
    assert resolve_schedule((3, 6, 12), (1, 2.5), "epoch", 40, 4, 12).starts == (0, 4, 10)


@pytest.mark.parametrize(
    "stages, switch, unit, match",
    [((3, 3, 12), (0.1, 0.2), "fraction", "strictly increasing"), ((-1, 6, 12), (0.1, 0.2), "fraction", ">= 1"),
     ((0,), (), "fraction", ">= 1"),
     ((1, 3, 6), (0.1, 0.2), "fraction", "end at the model depth"), ((1, 12), (0.1, 0.2), "fraction", "switch points"),
     ((1, 6, 12), (0.3, 0.2), "fraction", "strictly increasing"), ((1, 6, 12), (0.1, 1.5), "fraction", "inside"),
     ((1, 6, 12), (5, 500), "step", "inside"), ((1, 12), (0.1,), "weeks", "unit"), ((), (), "fraction", "empty")],
)
def test_bad_schedules(stages, switch, unit, match):
    with pytest.raises(ApolloError, match=match):
        resolve_schedule(stages, switch, unit, 100, 10, 12)


def test_method_defaults_follow_spec():
    apollo = resolve_method(MethodConfig("apollo"), 12)
    assert (apollo.stages, apollo.switch, apollo.sampler, apollo.growth) == (
        (1, 3, 6, 12), (0.05, 0.10, 0.25), "lvps", "interpolation")
    stack = resolve_method(MethodConfig("stackbert"), 12)
    assert (stack.stages, stack.sampler, stack.growth) == ((3, 6, 12), "none", "stacking")
    assert resolve_method(MethodConfig("scratch"), 12).stages == (12,)
    assert resolve_method(MethodConfig("apollo", sampler="us"), 12).sampler == "us"
    with pytest.raises(ApolloError, match="unknown method"):
        resolve_method(MethodConfig("apolo"), 12)
    with pytest.raises(ApolloError, match="switch"):
        resolve_method(MethodConfig("apollo", stages=(2, 12)), 12)


def test_rewarm_ramps_the_lr_after_each_growth_only():
    s = resolve_schedule((3, 6, 12), (0.1, 0.5), "fraction", 100, 10, 12)
    assert [s.rewarm(i, 4) for i in (0, 5, 9)] == [1.0, 1.0, 1.0]  # first stage: the global warmup's job
    assert [s.rewarm(i, 4) for i in (10, 11, 12, 13, 14)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert [s.rewarm(i, 4) for i in (50, 53, 99)] == [0.25, 1.0, 1.0]
    assert s.rewarm(10, 0) == 1.0


def test_new_method_fields_resolve_to_defaults_and_reject_bad_values():
    m = resolve_method(MethodConfig("apollo"), 12)
    assert (m.new_layers, m.rewarm) == ("copy", 0.0)
    assert resolve_method(MethodConfig("stackbert", new_layers="zeroed", rewarm=0.05), 12).rewarm == 0.05
    with pytest.raises(ApolloError, match="new-layers policy"):
        resolve_method(MethodConfig("apollo", new_layers="identity"), 12)
    with pytest.raises(ApolloError, match="rewarm"):
        resolve_method(MethodConfig("apollo", rewarm=1.5), 12)


def test_apollo_plus_defaults():
    m = resolve_method(MethodConfig("apollo-plus"), 12)
    assert (m.stages, m.switch, m.sampler, m.growth, m.new_layers, m.rewarm) == (
        (3, 6, 12), (0.20, 0.40), "none", "interpolation", "zeroed", 0.0)
    assert resolve_method(MethodConfig("apollo-plus", new_layers="copy"), 12).new_layers == "copy"  # flags win
