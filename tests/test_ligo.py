"""LiGO: the operator starts as FPI + stacking, training changes only the operator, merging keeps the loss, and
its FLOPs match FlopCounterMode."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from apollo.bert2bert import bert2bert, width_map
from apollo.flops import train_flops
from apollo.ligo import LiGO, merge, operator_loss
from apollo.models import build_model, lm_loss
from tests.test_bert2bert import cfg, trained_like


def batch(arch, seed=3):
    ids = torch.randint(5, 100, (2, 16), generator=torch.Generator().manual_seed(seed))
    if arch == "gpt2":
        return {"input_ids": ids, "labels": ids.clone()}
    labels = torch.full_like(ids, -100)
    labels[:, ::3] = ids[:, ::3]
    return {"input_ids": ids, "labels": labels}


def setup(arch, target=(32, 4, 64, 4)):
    small = trained_like(arch)
    model = build_model(cfg(arch, *target), target[3], seed=0)
    return small, model, LiGO(small, model, width_map(small.config, model.config, seed=0))


def test_operator_at_init_materialises_fpi_plus_stacking(arch):
    small, model, op = setup(arch)
    expected = dict(bert2bert(small, cfg(arch, 32, 4, 64, 4), "fpi", "copy", seed=0).named_parameters())
    with torch.no_grad():
        got = op.materialize()
    assert set(got) == {n for n, _ in model.named_parameters()}
    for name, w in got.items():
        torch.testing.assert_close(w, expected[name], atol=1e-6, rtol=1e-6)


def test_operator_training_changes_only_the_operator_and_merge_keeps_its_loss(arch):
    small, model, op = setup(arch)
    before_small = {n: p.clone() for n, p in small.named_parameters()}
    before_op = {n: p.clone() for n, p in op.named_parameters()}
    opt = torch.optim.AdamW(op.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for step in range(8):
        loss = operator_loss(op, model, batch(arch, step), arch == "bert")
        loss.backward()
        assert all(p.grad is None for p in model.parameters())  # the target's own weights are not trained
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, before_small[n]) for n, p in small.named_parameters())
    assert any(not torch.equal(p, before_op[n]) for n, p in op.named_parameters())
    with torch.no_grad():
        expected = operator_loss(op, model, batch(arch, 99), arch == "bert").item()
        merge(op, model)
        assert lm_loss(model, batch(arch, 99), arch == "bert").item() == pytest.approx(expected, abs=1e-5)


def test_operator_step_flops_match_flop_counter(arch):
    small, model, op = setup(arch)
    model.config._attn_implementation = "eager"  # FlopCounterMode does not see CPU SDPA kernels
    b = batch(arch)
    counter = FlopCounterMode(display=False)
    with counter:
        operator_loss(op, model, b, arch == "bert").backward()
    head = int((b["labels"] != -100).sum()) if arch == "bert" else b["input_ids"].numel()
    analytic = op.flops() + train_flops(model.config, 4, b["input_ids"].numel(), 16, head)
    assert abs(analytic - counter.get_total_flops()) / counter.get_total_flops() < 0.02
    assert op.flops() > 0
