"""Apollo, StackBERT and the FLOP counter on LLaMA and RoBERTa (and the registry's error for anything else)."""

import dataclasses
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, Qwen2Config, T5Config, T5ForConditionalGeneration

from apollo.config import ApolloError, DataConfig, MethodConfig, RunConfig, TrainConfig
from apollo.data import Batches, load_lm_data
from apollo.measure.flops import forward_flops, train_flops
from apollo.method.growth import expand_layers, layer_map, shared_layers
from apollo.models import build_model, get_layers, hf_config, set_layers
from apollo.runtime.train import train
from tests.conftest import tiny_model_config
from tests.test_cli import TINY, run_cli


def llama(live: int, layers: int = 12):
    cfg = dataclasses.replace(tiny_model_config("llama", layers), ffn=88)  # 8/3 x 32 rounded up to a multiple of 8
    return cfg, build_model(cfg, live, seed=0).eval()


def ids(batch=2, seq=16):
    return torch.randint(5, 512, (batch, seq), generator=torch.Generator().manual_seed(1))


def _perturb(model, seed=3):
    """Random non-trivial weights (RMSNorms included), as after training: nothing is an identity by accident."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))


# ---- the shared-layer pass on a model that runs layers[:config.num_hidden_layers] ------------------------------


def test_llama_shared_pass_runs_every_position_and_restores_the_config():
    """LlamaModel runs ``layers[:num_hidden_layers]``: 3 live layers at depth 8 must run all 8 positions, equal to a
    plain 8-layer LLaMA made of the same modules in map order, and cost 8 layers of FLOPs."""
    cfg, model = llama(3)
    _perturb(model)
    positions = layer_map("interpolation", 3, 8)
    model.config._attn_implementation = "eager"  # FlopCounterMode does not count CPU SDPA
    with torch.no_grad(), FlopCounterMode(display=False) as counter, shared_layers(model, positions):
        assert model.config.num_hidden_layers == 8
        shared = model(input_ids=ids()).logits
    assert model.config.num_hidden_layers == 3 and len(get_layers(model)) == 3
    assert counter.get_total_flops() == forward_flops(model.config, 8, 32, 16)

    explicit = build_model(cfg, 8, seed=0).eval()
    explicit.load_state_dict({k: v for k, v in model.state_dict().items() if ".layers." not in k}, strict=False)
    for j, i in enumerate(positions):
        get_layers(explicit)[j].load_state_dict(get_layers(model)[i].state_dict())
    with torch.no_grad():
        plain = explicit(input_ids=ids()).logits
        three = model(input_ids=ids()).logits  # outside the pass: the 3 live layers only
    assert torch.allclose(plain, shared, atol=1e-5)
    assert not torch.allclose(three, shared, atol=1e-3)


def test_per_layer_config_lists_follow_the_layers():
    """``layer_types`` keeps one entry per layer: copied from each new layer's source, resized when all equal."""
    config = Qwen2Config(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                         intermediate_size=64, use_sliding_window=True, max_window_layers=2, use_cache=False)
    model = AutoModelForCausalLM.from_config(config)
    kinds = ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]
    assert model.config.layer_types == kinds
    with shared_layers(model, layer_map("interpolation", 4, 6)):
        assert model.config.layer_types == [kinds[i] for i in (0, 0, 1, 2, 2, 3)]
        assert model.config.num_hidden_layers == 6
    assert model.config.layer_types == kinds and model.config.num_hidden_layers == 4
    source = expand_layers(model, 8, "stacking")
    assert model.config.layer_types == [kinds[i] for i in source] and model.config.num_hidden_layers == 8
    model.config.validate()  # HF's own check: as many layer types as layers
    with pytest.raises(ApolloError, match="layer_types differs between layers"):
        set_layers(model, torch.nn.ModuleList(list(get_layers(model))[:2]))
    uniform = AutoModelForCausalLM.from_config(Qwen2Config(vocab_size=64, hidden_size=32, num_hidden_layers=4,
                                                           num_attention_heads=2, intermediate_size=64))
    set_layers(uniform, torch.nn.ModuleList(list(get_layers(uniform)) * 2))
    assert uniform.config.layer_types == ["full_attention"] * 8 and uniform.config.num_hidden_layers == 8


@pytest.mark.parametrize("kind", ["interpolation", "stacking"])
def test_llama_layer_idx_renumbered_after_growth(kind):
    """Copies get their new position as ``layer_idx``, so a KV cache stores each layer separately: incremental
    decoding with a cache equals a full forward after growth."""
    _, model = llama(3)
    _perturb(model)
    expand_layers(model, 6, kind)
    assert [layer.self_attn.layer_idx for layer in get_layers(model)] == list(range(6))
    x = ids()
    with torch.no_grad():
        full = model(input_ids=x, use_cache=False).logits[:, -1]
        prefix = model(input_ids=x[:, :-1], use_cache=True)
        step = model(input_ids=x[:, -1:], past_key_values=prefix.past_key_values, use_cache=True).logits[:, -1]
    assert torch.allclose(full, step, atol=1e-5)


@pytest.mark.parametrize("kind, chain", [("interpolation", [1, 3, 6, 12]), ("stacking", [3, 6, 12])])
def test_zeroed_growth_preserves_llama_function(kind, chain):
    """Pre-RMSNorm: a repeat copy with zeroed o_proj and down_proj is the identity (apollo-plus growth)."""
    _, model = llama(chain[0])
    _perturb(model)
    for n_new in chain[1:]:
        with torch.no_grad():
            before = model(input_ids=ids()).logits
        expand_layers(model, n_new, kind, "zeroed")
        with torch.no_grad():
            after = model(input_ids=ids()).logits
        assert (after - before).abs().max() < 1e-5
        _perturb(model, seed=n_new)


def test_an_architecture_that_cannot_grow_is_a_clear_error():
    """Unregistered models are inspected (tests/test_universal.py); one with two layer stacks says so in one line."""
    model = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=2,
                                                num_heads=2))
    message = r"^T5ForConditionalGeneration is an encoder-decoder \(two layer stacks\); apollo grows one layer list$"
    for call in (lambda: get_layers(model), lambda: shared_layers(model, [0, 1]).__enter__(),
                 lambda: expand_layers(model, 4, "stacking")):
        with pytest.raises(ApolloError, match=message):
            call()
    with pytest.raises(ApolloError, match=r"^t5 is an encoder-decoder"):
        train_flops(model.config, 2, 32, 16)


# ---- end to end through apollo.runtime.train.train ------------------------------------------------------------------


def tiny_run(tmp_path, arch, method, steps=20) -> RunConfig:
    t = TrainConfig(batch_size=8, steps=steps, lr=2e-3, eval_every=10, eval_blocks=16, progress=False)
    return RunConfig(model=tiny_model_config(arch), method=MethodConfig(method), train=t,
                     data=DataConfig(synthetic_sentences=1500), out=str(tmp_path / f"{arch}-{method}"))


def records(run_dir, event):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def run(cfg: RunConfig):
    """Train; return the run directory, the trained model object and the models around each growth."""
    seen = {}

    def hook(when, step, model, positions):
        seen["model"] = model
        with torch.no_grad():
            was = model.training
            model.eval()
            seen[(when, step)] = model(input_ids=ids()).logits  # one pass through the live layers, native depth
            model.train(was)

    train(cfg, on_grow=hook)
    return cfg.out, seen


@pytest.mark.parametrize("arch", ["llama", "roberta"])
def test_apollo_run_through_all_stages(tmp_path, arch):
    cfg = tiny_run(tmp_path, arch, "apollo", steps=40)
    out, seen = run(cfg)
    out = tmp_path / f"{arch}-apollo"
    assert [(g["from"], g["to"]) for g in records(out, "grow")] == [(1, 3), (3, 6), (6, 12)]
    assert json.loads((out / "summary.json").read_text())["layers"] == 12
    steps = records(out, "step")
    assert {s["live_layers"] for s in steps} == {1, 3, 6, 12}
    assert any(d > s["live_layers"] for s in steps for d in s["depth"])  # shared passes deeper than the live layers

    # Every step's logged FLOPs are the formula at the depth it drew, with the head at its predicted positions.
    data = load_lm_data(cfg.data, cfg.model, 0)
    batches = Batches(data.train, 8, 0, data.tokenizer, data.mlm, 0.15)
    config, flops = hf_config(cfg.model), 0
    for s in steps:
        batch = batches.batch(s["step"])
        head = int((batch["labels"] != -100).sum()) if data.mlm else batch["input_ids"].numel()
        flops += train_flops(config, s["depth"][0], 8 * 16, 16, head)
        assert s["flops"] == flops

    # The saved model is the trained one, loadable with the Auto class of its kind.
    auto = AutoModelForMaskedLM if arch == "roberta" else AutoModelForCausalLM
    saved = auto.from_pretrained(out / "model").eval()
    assert type(saved).__name__ == ("RobertaForMaskedLM" if arch == "roberta" else "LlamaForCausalLM")
    assert saved.config.num_hidden_layers == 12 and len(get_layers(saved)) == 12
    trained = seen["model"].eval()
    x = data.valid[:2]
    with torch.no_grad():
        assert torch.allclose(saved(input_ids=x).logits, trained(input_ids=x).logits, atol=1e-5)


def test_stackbert_on_llama(tmp_path):
    cfg = tiny_run(tmp_path, "llama", "stackbert")
    train(cfg)
    out = tmp_path / "llama-stackbert"
    grows = records(out, "grow")
    assert [(g["from"], g["to"], g["growth"]) for g in grows] == [(3, 6, "stacking"), (6, 12, "stacking")]
    assert grows[0]["source"] == [0, 1, 2, 0, 1, 2]
    assert all(s["depth"] == [s["live_layers"]] for s in records(out, "step"))  # no depth sampling
    assert AutoModelForCausalLM.from_pretrained(out / "model").config.num_hidden_layers == 12


def test_apollo_plus_on_llama_is_function_preserving_at_growth(tmp_path):
    _, seen = run(tiny_run(tmp_path, "llama", "apollo-plus"))
    out = tmp_path / "llama-apollo-plus"
    grows = [g["step"] for g in records(out, "grow")]
    assert [(g["from"], g["to"], g["new_layers"]) for g in records(out, "grow")] == [(3, 6, "zeroed"),
                                                                                     (6, 12, "zeroed")]
    for step in grows:
        assert (seen[("after", step)] - seen[("before", step)]).abs().max() < 1e-5


def test_cli_trains_the_llama_tiny_preset(tmp_path):
    out = tmp_path / "run"
    r = run_cli("train", "--preset", "llama-tiny", "--method", "apollo-plus", *TINY, "--steps", "5", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "summary.json").read_text())["layers"] == 12
    assert json.loads((out / "model" / "config.json").read_text())["model_type"] == "llama"


def test_width_growth_refuses_an_architecture_without_a_width_layout():
    from apollo.baselines.bert2bert import small_shape

    with pytest.raises(ApolloError, match="supports for .* only, not roberta"):
        small_shape(tiny_model_config("roberta"))
