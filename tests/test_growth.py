import pytest
import torch

from apollo.config import ApolloError, TrainConfig
from apollo.method.growth import expand_layers, grow, interpolation_map, layer_map, shared_layers, stacking_map
from apollo.models import ADAPTERS, build_model, get_layers
from apollo.runtime.train import make_optimizer
from tests.conftest import tiny_model_config


def test_layer_maps_equal_spec_examples():
    assert interpolation_map(3, 8) == [0, 0, 0, 1, 1, 1, 2, 2]
    assert stacking_map(3, 8) == [0, 1, 2, 0, 1, 2, 1, 2]
    assert stacking_map(6, 9) == [0, 1, 2, 3, 4, 5, 3, 4, 5]
    assert interpolation_map(3, 6) == [0, 0, 1, 1, 2, 2]  # expansion 3 -> 6
    assert stacking_map(3, 6) == [0, 1, 2, 0, 1, 2]  # StackBERT doubling
    assert interpolation_map(1, 12) == [0] * 12 and interpolation_map(12, 12) == list(range(12))


def test_every_live_layer_used_at_every_depth_under_interpolation():
    for n in range(1, 13):
        for d in range(n, 13):
            m = interpolation_map(n, d)
            assert len(m) == d and set(m) == set(range(n)) and m == sorted(m)
            assert set(stacking_map(n, d)) == set(range(n))


def ids(batch=2, seq=16):
    return torch.randint(5, 128, (batch, seq), generator=torch.Generator().manual_seed(1))


def test_shared_layers_equals_explicit_deep_model(arch):
    cfg = tiny_model_config(arch)
    model = build_model(cfg, 3, seed=0).eval()
    names = [n for n, _ in model.named_parameters()]
    positions = layer_map("interpolation", 3, 8)
    with torch.no_grad(), shared_layers(model, positions):
        shared = model(input_ids=ids()).logits
    assert [n for n, _ in model.named_parameters()] == names and len(get_layers(model)) == 3
    explicit = build_model(cfg, 8, seed=0).eval()
    explicit.load_state_dict({k: v for k, v in model.state_dict().items() if ".layer" not in k and ".h." not in k},
                             strict=False)
    for j, i in enumerate(positions):
        get_layers(explicit)[j].load_state_dict(get_layers(model)[i].state_dict())
    with torch.no_grad():
        assert torch.allclose(explicit(input_ids=ids()).logits, shared, atol=1e-5)


def test_shared_layers_accumulates_gradients_into_live_weights(arch):
    model = build_model(tiny_model_config(arch), 1, seed=0)
    with shared_layers(model, [0] * 4):
        model(input_ids=ids(), labels=ids()).loss.backward()
    assert all(p.grad is not None for p in get_layers(model)[0].parameters())


@pytest.mark.parametrize("kind, steps", [("interpolation", [1, 3, 6, 12]), ("stacking", [3, 6, 12])])
def test_growth_copies_sources_and_preserves_full_depth_function(arch, kind, steps):
    model = build_model(tiny_model_config(arch), steps[0], seed=0).eval()
    for n_old, n_new in zip(steps, steps[1:], strict=False):
        with torch.no_grad(), shared_layers(model, layer_map(kind, n_old, 12)):
            before = model(input_ids=ids()).logits
        old = [layer.state_dict() for layer in get_layers(model)]
        source = expand_layers(model, n_new, kind)
        assert source == layer_map(kind, n_old, n_new)
        layers = get_layers(model)
        assert len(layers) == n_new == model.config.num_hidden_layers
        for j, i in enumerate(source):
            for k, v in layers[j].state_dict().items():
                assert torch.equal(v, old[i][k])
        with torch.no_grad(), shared_layers(model, layer_map(kind, n_new, 12)):
            assert torch.allclose(model(input_ids=ids()).logits, before, atol=1e-5)
    # after the last stage: L distinct layers, no parameter shared between them
    ptrs = [p.data_ptr() for layer in get_layers(model) for p in layer.parameters()]
    assert len(get_layers(model)) == 12 and len(ptrs) == len(set(ptrs))


@pytest.mark.parametrize("moments", ["copy", "reset", "fresh"])
def test_grow_rebuilds_optimizer_with_moment_policy(moments):
    t = TrainConfig(lr=1e-3)
    model = build_model(tiny_model_config("bert"), 3, seed=0)
    opt = make_optimizer(model, t)
    model(input_ids=ids(), labels=ids()).loss.backward()
    opt.step()
    old_layers = [{n: opt.state[p] for n, p in layer.named_parameters()} for layer in get_layers(model)]
    emb = model.bert.embeddings.word_embeddings.weight
    emb_state = opt.state[emb]["exp_avg"].clone()
    new_opt, source = grow(model, opt, 6, "interpolation", moments, lambda m: make_optimizer(m, t))
    assert new_opt is not opt and source == [0, 0, 1, 1, 2, 2]
    opt_params = {id(p) for g in new_opt.param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in model.parameters()}
    if moments == "fresh":  # a new AdamW: no parameter has state, embeddings included
        assert not new_opt.state
    else:
        assert torch.equal(new_opt.state[emb]["exp_avg"], emb_state)  # non-layer state kept
    for j, layer in enumerate(get_layers(model)):
        for n, p in layer.named_parameters():
            if moments in ("reset", "fresh"):
                assert p not in new_opt.state
            else:
                src = old_layers[source[j]][n]
                assert torch.equal(new_opt.state[p]["exp_avg"], src["exp_avg"])
                assert torch.equal(new_opt.state[p]["exp_avg_sq"], src["exp_avg_sq"])
                assert new_opt.state[p]["exp_avg"].data_ptr() != src["exp_avg"].data_ptr()
    model(input_ids=ids(), labels=ids()).loss.backward()
    new_opt.step()  # the rebuilt optimizer steps without error


def _perturb(model, seed=3):
    """Random non-trivial weights (LayerNorms included), as after training: nothing is an identity by accident."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("kind", ["interpolation", "stacking"])
def test_zeroed_growth_preserves_gpt2_function_at_native_depth(kind):
    """Pre-LN: a repeat copy with zeroed residual outputs is the identity, so logits match to 1e-5."""
    model = build_model(tiny_model_config("gpt2"), 1 if kind == "interpolation" else 3, seed=0).eval()
    _perturb(model)
    chain = [1, 3, 6, 12] if kind == "interpolation" else [3, 6, 12]
    for n_new in chain[1:]:
        with torch.no_grad():
            before = model(input_ids=ids()).logits
        source = expand_layers(model, n_new, kind, "zeroed")
        assert source == layer_map(kind, len(set(source)), n_new)
        with torch.no_grad():
            after = model(input_ids=ids()).logits
        assert (after - before).abs().max() < 1e-5
        _perturb(model, seed=n_new)  # the next growth starts from weights that moved again


def test_zeroed_growth_changes_exactly_the_repeat_copies_residual_outputs(arch):
    """BERT is post-LN (not claimed function-preserving); in both archs only repeat copies' output projections
    are zeroed, everything else equals the source layer."""
    model = build_model(tiny_model_config(arch), 3, seed=0)
    _perturb(model)
    old = [layer.state_dict() for layer in get_layers(model)]
    source = expand_layers(model, 6, "interpolation", "zeroed")
    outputs = ADAPTERS[model.config.model_type].residual_outputs
    for j, i in enumerate(source):
        repeat = i in source[:j]
        for k, v in get_layers(model)[j].state_dict().items():
            zeroed = repeat and any(k.startswith(o + ".") for o in outputs)
            assert torch.equal(v, torch.zeros_like(v) if zeroed else old[i][k]), (j, k)
    assert sum(i in source[:j] for j, i in enumerate(source)) == 3


def test_grow_gives_zeroed_projections_empty_moments():
    t = TrainConfig(lr=1e-3)
    model = build_model(tiny_model_config("gpt2"), 3, seed=0)
    opt = make_optimizer(model, t)
    model(input_ids=ids(), labels=ids()).loss.backward()
    opt.step()
    new_opt, source = grow(model, opt, 6, "stacking", "copy", lambda m: make_optimizer(m, t), "zeroed")
    for j, layer in enumerate(get_layers(model)):
        for n, p in layer.named_parameters():
            zeroed = j >= 3 and n.startswith(("attn.c_proj.", "mlp.c_proj."))
            assert (p not in new_opt.state) == zeroed, (j, n)
    model(input_ids=ids(), labels=ids()).loss.backward()
    new_opt.step()
    assert all(p.abs().sum() > 0 for p in get_layers(model)[4].mlp.c_proj.parameters())  # zeroed weights learn


@pytest.mark.parametrize("kind,moments,new_layers", [("interpolation", "copy", "copy"), ("stacking", "copy", "copy"),
                                                     ("interpolation", "reset", "copy"),
                                                     ("stacking", "fresh", "copy"),
                                                     ("interpolation", "copy", "zeroed")])
def test_grow_in_place_equals_the_rebuild_in_weights_and_adamw_state(arch, kind, moments, new_layers):
    """The Trainer's in-place growth (all slots allocated) and apollo train's rebuild give the same live layers,
    the same AdamW state per live parameter, and leave the idle slots alone."""
    from apollo.method.growth import grow_in_place

    t = TrainConfig(lr=1e-3)
    small, full = build_model(tiny_model_config(arch, layers=6), 3, seed=0), build_model(
        tiny_model_config(arch, layers=6), 6, seed=0)
    opt_s, opt_f = make_optimizer(small, t), make_optimizer(full, t)
    for model, opt in ((small, opt_s), (full, opt_f)):
        with shared_layers(model, [0, 1, 2]):
            model(input_ids=ids(), labels=ids()).loss.backward()
        opt.step()
    idle = [p.detach().clone() for p in get_layers(full)[5].parameters()]
    new_opt, source = grow(small, opt_s, 5, kind, moments, lambda m: make_optimizer(m, t), new_layers)
    assert grow_in_place(full, opt_f, 3, 5, kind, moments, new_layers) == source
    for a, b in zip(get_layers(small), list(get_layers(full))[:5], strict=True):
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            assert torch.equal(p, q)
            assert new_opt.state.get(p, {}).keys() == opt_f.state.get(q, {}).keys()
            for k, v in new_opt.state.get(p, {}).items():
                assert torch.equal(v, opt_f.state[q][k])
    assert all(torch.equal(p, q) for p, q in zip(get_layers(full)[5].parameters(), idle, strict=True))
    assert all(p not in opt_f.state for p in get_layers(full)[5].parameters())
    if moments == "fresh":  # embeddings and head start empty too, in both designs
        assert not new_opt.state and not opt_f.state


@pytest.mark.parametrize("n_old, kind", [(0, "interpolation"), (1, "interpolation"), (2, "middle")])
def test_grow_in_place_into_idle_slots_equals_the_rebuild_with_fresh_layers(arch, n_old, kind):
    """new_layers="random": the rebuild takes fresh layers from the L-layer init; in place they are the idle
    slots' own init. Both give the same layers and AdamW state; a fresh layer in a trained slot is refused."""
    from apollo.method.growth import FRESH, grow_in_place

    t, cfg = TrainConfig(lr=1e-3), tiny_model_config(arch, layers=4)
    small, full = build_model(cfg, n_old, seed=0), build_model(cfg, 4, seed=0)
    opt_s, opt_f = make_optimizer(small, t), make_optimizer(full, t)
    for model, opt in ((small, opt_s), (full, opt_f)):
        with shared_layers(model, list(range(n_old))):
            model(input_ids=ids(), labels=ids()).loss.backward()
        opt.step()
    new_opt, source = grow(small, opt_s, 4, kind, "copy", lambda m: make_optimizer(m, t), "random",
                           fresh=lambda: get_layers(build_model(cfg, 4, seed=0)))
    assert grow_in_place(full, opt_f, n_old, 4, kind, "copy", "random") == source and FRESH in source
    for a, b in zip(get_layers(small), get_layers(full), strict=True):
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            assert torch.equal(p, q) and new_opt.state.get(p, {}).keys() == opt_f.state.get(q, {}).keys()
    if n_old == 2:
        with pytest.raises(ApolloError, match="trained slot"):
            grow_in_place(full, opt_f, 2, 3, "interpolation", "copy", "random")  # source [0, FRESH, 1]
