"""The memory estimate against what a training step really holds, and the refusal of runs that cannot fit."""

import dataclasses

import pytest
import torch

from apollo.config import ApolloError, TrainConfig
from apollo.models import build_model, lm_loss
from apollo.runtime.memory import check_fits, estimate_bytes, parameters
from tests.conftest import tiny_model_config

FACTOR = 3  # the activation estimate is within this factor of the tensors autograd really saves


def saved_activation_bytes(model, batch, mlm) -> int:
    """Bytes of the distinct tensors autograd keeps for the backward pass of one step (parameters excluded)."""
    params = {p.data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(x):
        if x.data_ptr() not in params:
            seen[x.data_ptr()] = max(seen.get(x.data_ptr(), 0), x.numel() * x.element_size())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = lm_loss(model, batch, mlm)
    loss.backward()
    return sum(seen.values())


@pytest.mark.parametrize("arch, batch, seq", [("gpt2", 8, 32), ("bert", 4, 64), ("llama", 8, 16)])
def test_estimate_matches_a_real_step(arch, batch, seq):
    m = dataclasses.replace(tiny_model_config(arch, layers=4), seq_len=seq, ffn=88 if arch == "llama" else 64)
    t = TrainConfig(batch_size=batch)
    model = build_model(m, 4, 0)
    model.config._attn_implementation = "eager"
    assert parameters(m) == sum(p.numel() for p in model.parameters())
    ids = torch.randint(5, m.vocab, (batch, seq))
    labels = ids.clone()
    mlm = arch == "bert"
    real = saved_activation_bytes(model, {"input_ids": ids, "labels": labels}, mlm)
    optimizer = torch.optim.AdamW(model.parameters())
    optimizer.step()
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    held += sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    held += sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if v.dim())
    state, activations = estimate_bytes(m, t)
    assert state == held  # weights, gradients and both AdamW moments, exactly
    assert real / FACTOR <= activations <= real * FACTOR, (activations, real)


def test_a_run_that_cannot_fit_is_refused_before_anything_is_allocated():
    m = dataclasses.replace(tiny_model_config("gpt2"), layers=100_000)
    with pytest.raises(ApolloError, match=r"^this run needs about .* GiB .* but cpu has .* GiB free; lower"):
        check_fits(m, TrainConfig(), torch.device("cpu"))
    check_fits(tiny_model_config("gpt2"), TrainConfig(), torch.device("cpu"))  # a tiny run fits
