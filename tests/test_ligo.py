"""LiGO: the operator starts as FPI + stacking, training changes only the operator, merging keeps the loss, and
its FLOPs match FlopCounterMode; for BERT, GPT-2 and the LLaMA family (grouped-query attention)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from apollo.baselines.bert2bert import bert2bert, width_map
from apollo.baselines.ligo import LiGO, merge, operator_loss
from apollo.measure.flops import train_flops
from apollo.models import build_model, lm_loss
from tests.test_bert2bert import LLAMA_FAMILY, cfg, gqa_cfg, gqa_trained_like, trained_like

GQA_TARGET = (64, 8, 4, 128, 4)  # from GQA_SMALL (32, 4, 2, 64, 2): width and depth


def batch(arch, seed=3, vocab=100):
    ids = torch.randint(5, vocab, (2, 16), generator=torch.Generator().manual_seed(seed))
    if arch != "bert":  # causal LM
        return {"input_ids": ids, "labels": ids.clone()}
    labels = torch.full_like(ids, -100)
    labels[:, ::3] = ids[:, ::3]
    return {"input_ids": ids, "labels": labels}


def setup(arch, target=(32, 4, 64, 4)):
    small = trained_like(arch)
    model = build_model(cfg(arch, *target), target[3], seed=0)
    return small, model, LiGO(small, model, width_map(small.config, model.config, seed=0))


def gqa_setup(tmp_path, model_type, tie=False):
    small = gqa_trained_like(tmp_path, model_type, tie=tie)
    target = gqa_cfg(tmp_path, model_type, GQA_TARGET, tie)
    model = build_model(target, target.layers, seed=0)
    return small, model, LiGO(small, model, width_map(small.config, model.config, seed=0)), target


def test_operator_at_init_materialises_fpi_plus_stacking(arch):
    small, model, op = setup(arch)
    assert_materialises(op, model, bert2bert(small, cfg(arch, 32, 4, 64, 4), "fpi", "copy", seed=0))


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("model_type", list(LLAMA_FAMILY))
def test_operator_at_init_materialises_fpi_plus_stacking_for_the_llama_family(tmp_path, model_type, tie):
    small, model, op, target = gqa_setup(tmp_path, model_type, tie)
    assert_materialises(op, model, bert2bert(small, target, "fpi", "copy", seed=0))


def assert_materialises(op, model, grown):
    expected = dict(grown.named_parameters())
    with torch.no_grad():
        got = op.materialize()
    assert set(got) == {n for n, _ in model.named_parameters()}
    for name, w in got.items():
        torch.testing.assert_close(w, expected[name], atol=1e-6, rtol=1e-6)


def test_operator_training_changes_only_the_operator_and_merge_keeps_its_loss(arch):
    small, model, op = setup(arch)
    assert_operator_trains_and_merges(small, model, op, arch)


@pytest.mark.parametrize("model_type", list(LLAMA_FAMILY))
def test_llama_family_operator_trains_and_merges_into_the_target_shapes(tmp_path, model_type):
    small, model, op, target = gqa_setup(tmp_path, model_type)
    assert_operator_trains_and_merges(small, model, op, model_type, vocab=64)
    fresh = build_model(target, target.layers, seed=5)
    assert {n: p.shape for n, p in model.named_parameters()} == {n: p.shape for n, p in fresh.named_parameters()}
    assert model.model.layers[3].self_attn.k_proj.weight.shape == (4 * 8, 64) and len(model.model.layers) == 4


def assert_operator_trains_and_merges(small, model, op, arch, vocab=100):
    before_small = {n: p.clone() for n, p in small.named_parameters()}
    before_op = {n: p.clone() for n, p in op.named_parameters()}
    opt = torch.optim.AdamW(op.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for step in range(8):
        loss = operator_loss(op, model, batch(arch, step, vocab), arch == "bert")
        loss.backward()
        assert all(p.grad is None for p in model.parameters())  # the target's own weights are not trained
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, before_small[n]) for n, p in small.named_parameters())
    assert any(not torch.equal(p, before_op[n]) for n, p in op.named_parameters())
    with torch.no_grad():
        expected = operator_loss(op, model, batch(arch, 99, vocab), arch == "bert").item()
        merge(op, model)
        assert lm_loss(model, batch(arch, 99, vocab), arch == "bert").item() == pytest.approx(expected, abs=1e-5)


def test_operator_step_flops_match_flop_counter(arch):
    small, model, op = setup(arch)
    assert_flops_match(model, op, arch, batch(arch))


@pytest.mark.parametrize("model_type", list(LLAMA_FAMILY))
def test_llama_family_operator_step_flops_match_flop_counter(tmp_path, model_type):
    small, model, op, _ = gqa_setup(tmp_path, model_type)
    assert_flops_match(model, op, model_type, batch(model_type, vocab=64))


def assert_flops_match(model, op, arch, b):
    model.config._attn_implementation = "eager"  # FlopCounterMode does not see CPU SDPA kernels
    counter = FlopCounterMode(display=False)
    with counter:
        operator_loss(op, model, b, arch == "bert").backward()
    head = int((b["labels"] != -100).sum()) if arch == "bert" else b["input_ids"].numel()
    analytic = op.flops() + train_flops(model.config, 4, b["input_ids"].numel(), 16, head)
    assert abs(analytic - counter.get_total_flops()) / counter.get_total_flops() < 0.02
    assert op.flops() > 0
