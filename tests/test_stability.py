"""apollo.measure.stability: the measurements of the stability study (paper Tables 2-3, Fig. 5), on tiny models."""

import dataclasses

import pytest
import torch

from apollo.config import DataConfig, MethodConfig, RunConfig, TrainConfig
from apollo.data import LMData, pack_blocks, synthetic_corpus, train_tokenizer, valid_batches
from apollo.measure.stability import GrowthProbe, StopAtGrowth, expanded, measure
from apollo.method.growth import expand_layers, layer_map
from apollo.models import build_model, get_layers, lm_loss
from apollo.runtime.train import evaluate, train
from tests.conftest import tiny_model_config


@pytest.fixture(scope="module")
def tiny_data() -> dict:
    texts = synthetic_corpus(400, seed=0)
    out = {}
    for arch in ("bert", "gpt2"):
        tok = train_tokenizer(texts, arch, 512)
        blocks = pack_blocks(texts, tok, 16, arch)
        out[arch] = LMData(tok, blocks[:-24], blocks[-24:], arch == "bert", "synthetic (test)")
    return out


def batches_for(data: LMData) -> list[dict]:
    return valid_batches(data.valid, 8, data.tokenizer, data.mlm, 0.15, 0, 20)  # batches of 8, 8, 4


def last_layer_output(model, batch, arch) -> torch.Tensor:
    """The last layer's output by another route than measure's hooks: BERT's last_hidden_state, GPT-2's ln_f input."""
    if arch == "bert":
        return model.base_model(input_ids=batch["input_ids"]).last_hidden_state
    seen = []
    handle = model.transformer.ln_f.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    model(input_ids=batch["input_ids"])
    handle.remove()
    return seen[0]


def test_measure_matches_hand_computation(tiny_data, arch):
    data, model = tiny_data[arch], build_model(tiny_model_config(arch), 3, seed=0)
    batches = batches_for(data)
    result = measure(model, batches, data.mlm)
    assert len(result.grad_norms) == 3
    for batch, norm in zip(batches, result.grad_norms, strict=True):
        model.zero_grad(set_to_none=True)
        lm_loss(model, batch, data.mlm).backward()
        hand = sum(float((p.grad.double() ** 2).sum()) for p in model.parameters() if p.grad is not None) ** 0.5
        assert norm == pytest.approx(hand, rel=1e-5)
    model.zero_grad(set_to_none=True)
    assert result.val_loss == pytest.approx(evaluate(model, batches, [0, 1, 2], data.mlm), rel=1e-6)
    with torch.no_grad():
        acts = torch.cat([last_layer_output(model, b, arch).flatten() for b in batches]).double()
    assert result.act_mean == pytest.approx(float(acts.mean()), abs=1e-5)
    assert result.act_std == pytest.approx(float(acts.std(unbiased=False)), rel=1e-4)
    assert result.act_max_abs == pytest.approx(float(acts.abs().max()), rel=1e-6)
    row = result.row()
    assert row["grad_norm_min"] <= row["grad_norm_median"] <= row["grad_norm_max"]


def test_shared_full_depth_equals_expanded_model(tiny_data):
    """Growth copies along the sharing map, so before@full and after compute the same loss and activations."""
    data = tiny_data["gpt2"]
    model = build_model(tiny_model_config("gpt2"), 6, seed=0)
    for kind in ("interpolation", "stacking"):
        shared = measure(model, batches_for(data), data.mlm, layer_map(kind, 6, 12))
        grown = measure(expanded(model, 12, kind), batches_for(data), data.mlm)
        assert shared.val_loss == pytest.approx(grown.val_loss, rel=1e-5)
        assert torch.allclose(shared.act_sample, grown.act_sample, atol=1e-5)


def test_probe_leaves_parameters_grads_mode_and_rng_unchanged(tiny_data, arch):
    data, model = tiny_data[arch], build_model(tiny_model_config(arch), 6, seed=0)
    probe = GrowthProbe(batches_for(data), data.mlm, 6, 12)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    probe("before", 7, model, layer_map("interpolation", 6, 12))
    assert torch.equal(torch.get_rng_state(), rng) and model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    expand_layers(model, 12, "interpolation")
    after = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(StopAtGrowth):
        probe("after", 7, model, list(range(12)))
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, after[k]) for k, v in model.state_dict().items())
    assert set(probe.results) == {"before@live", "before@full", "after"} and probe.step == 7


def test_probe_inside_train_does_not_change_the_run(tmp_path, tiny_data):
    data = tiny_data["gpt2"]
    model_cfg = dataclasses.replace(tiny_model_config("gpt2"), dropout=0.1)  # training draws from the global RNG
    cfg = RunConfig(model=model_cfg, method=MethodConfig("apollo"),
                    train=TrainConfig(batch_size=8, steps=40, lr=2e-3, eval_every=10, eval_blocks=8, progress=False),
                    data=DataConfig())
    plain = train(dataclasses.replace(cfg, out=str(tmp_path / "plain")), data)
    probe = GrowthProbe(batches_for(data), data.mlm, 6, 12, stop=False)
    probed = train(dataclasses.replace(cfg, out=str(tmp_path / "probed")), data, on_grow=probe)
    assert probed["final_val_loss"] == plain["final_val_loss"] and probe.step == 10  # 6 -> 12 at 25% of 40 steps
    lines = [(tmp_path / run / "metrics.jsonl").read_text().splitlines() for run in ("plain", "probed")]
    strip = [[line.split('"wall_s"')[0] for line in run] for run in lines]  # identical apart from timings
    assert strip[0] == strip[1]
    with pytest.raises(StopAtGrowth):
        train(dataclasses.replace(cfg, out=str(tmp_path / "stopped")), data,
              on_grow=GrowthProbe(batches_for(data), data.mlm, 6, 12))


@pytest.mark.parametrize("kind, sources", [("interpolation", [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]),
                                           ("stacking", [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5])])
def test_expansion_copies_source_layers(arch, kind, sources):
    source = build_model(tiny_model_config(arch, layers=6), 6, seed=0)
    assert layer_map(kind, 6, 12) == sources
    grown = expanded(source, 12, kind)
    assert len(get_layers(source)) == 6 and len(get_layers(grown)) == 12 and grown.config.num_hidden_layers == 12
    for i, j in enumerate(sources):
        new, old = get_layers(grown)[i].state_dict(), get_layers(source)[j].state_dict()
        assert new.keys() == old.keys() and all(torch.equal(new[k], old[k]) for k in new)
    assert get_layers(grown)[0] is not get_layers(grown)[1]  # copies, not shared modules
    rest = {k: v for k, v in source.state_dict().items() if ".layer." not in k and ".h." not in k}
    assert all(torch.equal(grown.state_dict()[k], v) for k, v in rest.items())
