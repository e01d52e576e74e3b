"""The methods table and the 2024-2026 growth methods: zero/one-layer expansion (Bu 2025), G_stack (Du et al.
2024), MIDAS (Saunshi et al. 2024). Exact maps, every live layer used, fresh layers equal to the L-layer init,
AdamW-state policies, zero-layer FLOPs against FlopCounterMode, and whole runs through the training loop."""

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from apollo.config import ApolloError, DataConfig, MethodConfig, RunConfig, TrainConfig
from apollo.measure.flops import train_flops
from apollo.measure.plan import format_plan, plan
from apollo.method.growth import FRESH, expand_layers, expansion_source, grow, layer_map, middle_map
from apollo.method.sampling import DepthSampler, depth_distribution
from apollo.method.table import METHOD_TABLE, METHODS, prop_schedule, resolve_method
from apollo.models import build_model, get_layers
from apollo.runtime.train import make_optimizer, train
from tests.conftest import tiny_model_config


def test_middle_map_duplicates_the_ceil_half_block_right_after_itself():
    assert middle_map(2, 4) == [0, 1, 0, 1]  # one block: copied after itself
    assert middle_map(4, 6) == [0, 1, 0, 1, 2, 3]  # 2 blocks of 2: block ceil(2/2) = 1 (the first)
    assert middle_map(6, 8) == [0, 1, 2, 3, 2, 3, 4, 5]  # 3 blocks: the middle one
    assert middle_map(8, 10) == [0, 1, 2, 3, 2, 3, 4, 5, 6, 7]
    assert middle_map(10, 12) == [0, 1, 2, 3, 4, 5, 4, 5, 6, 7, 8, 9]
    assert middle_map(6, 9) == [0, 1, 2, 0, 1, 2, 3, 4, 5]
    assert middle_map(3, 6) == [0, 1, 2, 0, 1, 2]  # one block doubled: StackBERT's doubling
    assert middle_map(1, 12) == [0] * 12 and middle_map(12, 12) == list(range(12))


@given(st.integers(1, 24).flatmap(lambda n: st.tuples(st.just(n), st.integers(n, 48))))
def test_middle_map_keeps_every_live_layer_and_its_order(nd):
    n, d = nd
    m = middle_map(n, d)
    assert len(m) == d and set(m) == set(range(n)) and layer_map("middle", n, d) == m
    assert [i for j, i in enumerate(m) if i not in m[:j]] == list(range(n))  # first copies in order


def test_zero_layer_maps_and_sources():
    assert layer_map("interpolation", 0, 0) == []
    with pytest.raises(ApolloError):
        layer_map("interpolation", 0, 4)
    assert expansion_source("interpolation", 0, 4, "random") == [FRESH] * 4
    assert expansion_source("interpolation", 1, 4, "random") == [0, FRESH, FRESH, FRESH]
    assert expansion_source("stacking", 2, 4, "random") == [0, 1, FRESH, FRESH]
    with pytest.raises(ApolloError, match="zero layers"):
        expansion_source("interpolation", 0, 4, "copy")


def test_every_method_resolves_with_a_card_at_every_depth():
    for name, spec in METHOD_TABLE.items():
        assert spec.card and spec.name == name
        for depth in (1, 2, 4, 6, 12, 24):
            if spec.from_small:
                continue
            m = resolve_method(MethodConfig(name), depth)
            assert m.stages[-1] == depth and len(m.switch) == len(m.stages) - 1
    assert METHODS[:6] == ("scratch", "stackbert", "apollo", "apollo-plus", "bert2bert", "ligo")


def test_new_methods_follow_their_papers_at_depth_12():
    got = {n: resolve_method(MethodConfig(n), 12) for n in ("zero-layer", "one-layer", "gstack", "midas")}
    z, o, g, mi = got.values()
    assert (z.stages, z.switch, z.new_layers, z.sampler) == ((0, 12), (0.8,), "random", "none")
    assert (o.stages, o.switch, o.new_layers, o.growth) == ((1, 12), (0.8,), "copy", "interpolation")
    assert (g.stages, g.growth, g.moments, g.rewarm) == ((3, 12), "stacking", "fresh", 0.025)
    assert layer_map(g.growth, 3, 12) == [0, 1, 2] * 4  # the whole 3-layer model stacked x4
    assert (mi.stages, mi.growth) == ((2, 4, 6, 8, 10, 12), "middle")
    lengths = [b - a for a, b in zip((0, *mi.switch), (*mi.switch, 1.0), strict=True)]
    assert lengths == pytest.approx([i / 21 for i in range(1, 7)], abs=1e-5)  # PROP-1: stage i takes i / 21
    assert prop_schedule(3, 2.0) == pytest.approx((1 / 14, 5 / 14), abs=1e-6)  # PROP-2: 1 : 4 : 9


def test_a_zero_layer_stage_needs_no_sampling_and_fresh_layers():
    with pytest.raises(ApolloError, match="zero-layer"):
        resolve_method(MethodConfig("zero-layer", new_layers="copy"), 12)
    with pytest.raises(ApolloError, match="zero-layer"):
        resolve_method(MethodConfig("apollo", stages=(0, 12), switch=(0.5,)), 12)
    assert DepthSampler("none", 12, 0)(0) == 0


def test_zero_layer_growth_installs_the_l_layer_init_with_empty_adamw_state(arch):
    cfg = tiny_model_config(arch, layers=4)
    model = build_model(cfg, 0, seed=0)
    opt = make_optimizer(model, TrainConfig())
    model(input_ids=torch.randint(5, 100, (2, 8)), labels=torch.randint(5, 100, (2, 8))).loss.backward()
    opt.step()
    init = build_model(cfg, 4, seed=0)
    new_opt, source = grow(model, opt, 4, "interpolation", "copy", lambda m: make_optimizer(m, TrainConfig()),
                           "random", fresh=lambda: get_layers(build_model(cfg, 4, seed=0)))
    assert source == [FRESH] * 4 and len(get_layers(model)) == 4
    for a, b in zip(get_layers(model), get_layers(init), strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    layer_ids = {id(p) for p in get_layers(model).parameters()}
    assert not any(id(p) in layer_ids for p in new_opt.state)  # fresh layers: no moments
    assert sum(1 for p in model.parameters() if p in new_opt.state) > 0  # embeddings / head keep theirs


def test_one_layer_expansion_copies_the_layer_and_its_moments():
    cfg = tiny_model_config("gpt2", layers=4)
    model = build_model(cfg, 1, seed=0)
    opt = make_optimizer(model, TrainConfig())
    model(input_ids=torch.randint(5, 100, (2, 8)), labels=torch.randint(5, 100, (2, 8))).loss.backward()
    opt.step()
    old = get_layers(model)[0]
    old_state = {k: v.clone() for k, v in old.state_dict().items()}
    old_moments = [opt.state[p]["exp_avg"].clone() for p in old.parameters()]
    new_opt, source = grow(model, opt, 4, "interpolation", "copy", lambda m: make_optimizer(m, TrainConfig()))
    assert source == [0, 0, 0, 0]
    for layer in get_layers(model):
        assert all(torch.equal(v, old_state[k]) for k, v in layer.state_dict().items())
        assert all(torch.equal(new_opt.state[p]["exp_avg"], mo) for p, mo in zip(layer.parameters(), old_moments,
                                                                               strict=True))


def grown_logit_change(layers: int, n_live: int, kind: str) -> tuple[list[int], float]:
    """Grow a perturbed GPT-2 (nothing an identity by accident) from ``n_live`` to ``layers`` with zeroed copies;
    the source map and the largest change of its logits."""
    model = build_model(tiny_model_config("gpt2", layers=layers), n_live, seed=0).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        ids = torch.randint(5, 128, (2, 16), generator=torch.Generator().manual_seed(1))
        before = model(input_ids=ids).logits
        source = expand_layers(model, layers, kind, "zeroed")
        return source, float((model(input_ids=ids).logits - before).abs().max())


def test_middle_growth_with_zeroed_copies_preserves_gpt2_function():
    source, change = grown_logit_change(6, 4, "middle")
    assert source == [0, 1, 0, 1, 2, 3] and change < 1e-5


def test_zero_layer_step_flops_match_flop_counter(arch):
    model = build_model(tiny_model_config(arch, layers=4), 0, seed=0)
    ids = torch.randint(5, 100, (2, 16))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids).logits.float().sum().backward()
    assert train_flops(model.config, 0, ids.numel(), 16) == counter.get_total_flops()  # the LM head alone


def tiny_run(tmp_path, method: str, arch: str = "gpt2", **method_kw) -> RunConfig:
    return RunConfig(model=tiny_model_config(arch, layers=4), method=MethodConfig(method, **method_kw),
                     train=TrainConfig(batch_size=4, steps=20, lr=2e-3, eval_every=5, eval_blocks=4, progress=False,
                                       threads=1),
                     data=DataConfig(synthetic_sentences=800), out=str(tmp_path / method))


def run(tmp_path, method: str, arch: str = "gpt2", **method_kw) -> tuple[dict, list[dict]]:
    cfg = tiny_run(tmp_path, method, arch, **method_kw)
    summary = train(cfg)
    # apollo plan: the loop's own count for every unsampled causal-LM method; an MLM's masked count varies
    assert plan(cfg).flops == (summary["flops"] if arch == "gpt2" else pytest.approx(summary["flops"], rel=0.1))
    return summary, [json.loads(x) for x in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]


def test_zero_layer_run_trains_head_only_then_the_full_model(tmp_path, arch):
    summary, log = run(tmp_path, "zero-layer", arch)
    steps = [r for r in log if r["event"] == "step"]
    assert [s["depth"] for s in steps] == [[0]] * 16 + [[4]] * 4  # expansion at 80% of 20 steps
    assert [(g["from"], g["to"], g["step"], g["source"]) for g in log if g["event"] == "grow"] == [
        (0, 4, 16, [FRESH] * 4)]
    head_only = steps[1]["flops"] - steps[0]["flops"]
    full = steps[-1]["flops"] - steps[-2]["flops"]
    assert 0 < head_only < full / 2
    evals = [r for r in log if r["event"] == "eval"]
    head_evals = [e["val_loss"] for e in evals if e["live_layers"] == 0]
    assert len(head_evals) == 3 and head_evals[-1] < head_evals[0] - 0.05  # the head-only model learns
    assert summary["layers"] == 4


@pytest.mark.parametrize("method, grows", [("one-layer", [(1, 4, 16)]), ("gstack", [(1, 4, 1)]),
                                           ("midas", [(1, 2, 2), (2, 3, 6), (3, 4, 12)])])
def test_new_methods_grow_where_their_schedules_say(tmp_path, method, grows):
    _, log = run(tmp_path, method)
    assert [(g["from"], g["to"], g["step"]) for g in log if g["event"] == "grow"] == grows
    steps = [r for r in log if r["event"] == "step"]
    assert all(s["depth"] == [s["live_layers"]] for s in steps)  # no depth sampling
    if method == "gstack":  # fresh AdamW state and an LR ramp back up after the stack (rewarm 2.5% of 20 = 0.5)
        assert all(g["moments"] == "fresh" for g in log if g["event"] == "grow")


def test_plan_prints_stages_and_the_share_of_scratch_and_matches_lvps_in_expectation(tmp_path):
    p = plan(tiny_run(tmp_path, "one-layer"))
    assert [(s.live_layers, s.first_step, s.steps) for s in p.stages] == [(1, 0, 16), (4, 16, 4)]
    text = format_plan(p)
    assert "| 1 | 4 | 16-19 |" in text and f"{100 * p.flops / p.scratch_flops:.1f}% of Scratch's" in text
    apollo = plan(tiny_run(tmp_path, "apollo"))
    lvps = [s.mean_depth for s in apollo.stages]
    assert lvps[0] == pytest.approx(sum(d * q for d, q in depth_distribution("lvps", 1, 4).items()))
    assert lvps[-1] == 4 and plan(tiny_run(tmp_path, "scratch")).flops == p.scratch_flops


def test_plan_cli_needs_a_run_length_in_tokens_or_steps():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "apollo", "plan", "--arch", "gpt2", "--epochs", "2"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == ("apollo: error: apollo plan needs the run length as --steps or "
                                                      "--tokens (--epochs depends on the data)")
    r = subprocess.run([sys.executable, "-m", "apollo", "plan", "--preset", "gpt-tiny", "--tokens", "1500000"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "| zero-layer | 0 -> 12 | 586 | none | 9.694 | 32.8% |" in r.stdout


def test_apollo_jump_is_one_function_preserving_jump_from_one_layer():
    m = resolve_method(MethodConfig("apollo-jump"), 12)
    assert (m.stages, m.switch, m.sampler, m.new_layers) == ((1, 12), (0.8,), "none", "zeroed")
    source, change = grown_logit_change(12, 1, m.growth)
    assert source == [0] * 12 and change < 1e-5  # the 12-layer model computes what the 1-layer one did


def test_apollo_twostep_grows_twice_late_and_preserves_the_function():
    m = resolve_method(MethodConfig("apollo-twostep"), 12)
    assert (m.stages, m.switch, m.sampler, m.new_layers) == ((2, 4, 12), (0.5, 0.8), "none", "zeroed")
    assert resolve_method(MethodConfig("apollo-twostep"), 2).stages == (1, 2)  # stages that coincide merge
    source, change = grown_logit_change(12, 4, m.growth)
    assert source == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3] and change < 1e-5
