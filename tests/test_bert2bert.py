"""bert2BERT: FPI is function-preserving (width, depth, both); AKI changes exactly the new units of lower layers."""

import dataclasses

import pytest
import torch

from apollo.bert2bert import bert2bert, check_small, expand, load_small, small_shape, widen, width_map
from apollo.config import ApolloError, ModelConfig
from apollo.models import build_model, get_layers, layer_path, width_axes, width_key

# (hidden, heads, ffn, layers): head size 8 throughout; FFN 24 -> 64 is not a multiple (random copies).
SMALL = (16, 2, 24, 2)
CASES = {"width": (32, 4, 64, 2), "depth": (16, 2, 24, 5), "both": (32, 4, 64, 4), "width x3": (48, 6, 64, 2)}


def cfg(arch, hidden, heads, ffn, layers) -> ModelConfig:
    return ModelConfig(arch, layers, hidden, heads, ffn, 100, 16, 0.0)


def trained_like(arch, shape=SMALL, seed=1):
    """A small model with every weight moved away from its init (LayerNorms included), as a trained one would be."""
    model = build_model(cfg(arch, *shape), shape[3], seed).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model


def logits(model, seed=2):
    """Logits computed in float64, so the comparison sees the grown weights, not float32 summation order."""
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval().double()(input_ids=ids).logits


@pytest.mark.parametrize("case", list(CASES))
def test_fpi_preserves_the_function(arch, case):
    small = trained_like(arch)
    big = bert2bert(small, cfg(arch, *CASES[case]), "fpi", "zeroed", seed=0)
    assert len(get_layers(big)) == CASES[case][3] and big.config.hidden_size == CASES[case][0]
    torch.testing.assert_close(logits(big), logits(small), atol=1e-5, rtol=0)


def test_paper_stacking_is_not_function_preserving_but_copies_layers(arch):
    small = trained_like(arch)
    big = bert2bert(small, cfg(arch, *CASES["depth"]), "fpi", "copy", seed=0)
    assert (logits(big) - logits(small)).abs().max() > 1e-2
    layers = get_layers(big)
    for j, i in enumerate([0, 1, 0, 1, 1]):  # stacking_map(2, 5)
        for a, b in zip(layers[j].parameters(), get_layers(small)[i].parameters(), strict=True):
            assert torch.equal(a, b)


def test_width_map_keeps_originals_and_balances_hidden_units():
    small, big = cfg("gpt2", *SMALL), cfg("gpt2", *CASES["width"])
    wmap = width_map(build_model(small, 2, 0).config, build_model(big, 2, 0).config, seed=0)
    assert wmap.index["h"].tolist() == list(range(16)) * 2 and set(wmap.counts["h"].tolist()) == {2.0}
    assert wmap.index["f"][:24].tolist() == list(range(24)) and wmap.counts["f"].sum() == 64
    heads = wmap.index["a"].view(4, 8)  # whole heads are copied: each row is one source head's 8 units
    assert heads[:2].flatten().tolist() == list(range(16))
    assert all(row.tolist() == list(range(int(row[0]), int(row[0]) + 8)) and row[0] % 8 == 0 for row in heads)
    assert wmap.new["qkv"].sum() == 3 * 16 and wmap.new["f"].sum() == 40


def test_expand_divides_input_axes_by_copy_counts():
    wmap = width_map(build_model(cfg("bert", *SMALL), 2, 0).config,
                     build_model(cfg("bert", *CASES["width"]), 2, 0).config, seed=0)
    w = torch.arange(24 * 16, dtype=torch.float32).view(24, 16)  # a BERT intermediate.dense weight: (ffn, hidden)
    grown = expand(w, ("f", "h/"), wmap)
    assert grown.shape == (64, 32)
    for i in (0, 30, 63):
        for j in (3, 19):
            assert grown[i, j] == w[wmap.index["f"][i], j % 16] / 2  # every hidden unit has two copies


def test_aki_changes_exactly_the_new_units_of_lower_layers(arch):
    small = trained_like(arch, (16, 2, 24, 3))
    big_cfg = cfg(arch, 32, 4, 64, 3)
    target = build_model(big_cfg, 3, 0)
    wmap = width_map(small.config, target.config, seed=0)
    fpi, aki = widen(small, target, wmap, "fpi"), widen(small, target, wmap, "aki")
    prefix, axes = layer_path(target) + ".", width_axes(target)
    changed = 0
    for name, w in fpi.items():
        if not name.startswith(prefix) or name.startswith(f"{prefix}2."):
            assert torch.equal(aki[name], w), name  # embeddings, head and the top layer keep FPI
            continue
        index, rest = name[len(prefix):].split(".", 1)
        upper = fpi[f"{prefix}{int(index) + 1}.{rest}"]
        mask = torch.zeros(w.shape, dtype=torch.bool)
        for dim, code in enumerate(axes[width_key(target, name)]):
            if code and not code.endswith("/"):
                view = [1] * w.ndim
                view[dim] = -1
                mask |= wmap.new[code].view(view)
        assert torch.equal(aki[name][mask], upper[mask]) and torch.equal(aki[name][~mask], w[~mask]), name
        changed += int(mask.sum())
    assert changed > 0
    big = bert2bert(small, big_cfg, "aki", "copy", seed=0)
    assert (logits(big) - logits(small)).abs().max() > 1e-3  # AKI is documented as not function-preserving


@pytest.mark.parametrize("change, message", [
    ({"heads": 8}, "head size differs"),
    ({"hidden": 16, "heads": 1}, "larger than the target"),
    ({"layers": 1}, "larger than the target"),
    ({"vocab": 200}, "must match"),
    ({"arch": "gpt2"}, "small model is bert"),
])
def test_small_model_that_cannot_grow_into_the_target_is_refused(change, message):
    small = build_model(cfg("bert", 32, 2, 64, 2), 2, 0).config  # head size 16
    target = dataclasses.replace(cfg("bert", 64, 4, 128, 12), **change)
    with pytest.raises(ApolloError, match=message):
        check_small(small, target)


def test_load_small_needs_a_saved_model(tmp_path):
    with pytest.raises(ApolloError, match="no trained model"):
        load_small(tmp_path, cfg("bert", 64, 4, 128, 12))
    model = build_model(cfg("gpt2", 32, 2, 64, 2), 2, 0)
    model.save_pretrained(tmp_path / "model")
    assert load_small(tmp_path, cfg("gpt2", 64, 4, 128, 12)).config.hidden_size == 32


def test_small_shape_halves_width_and_keeps_head_size():
    s = small_shape(cfg("bert", 128, 4, 512, 12))
    assert (s.hidden, s.heads, s.ffn, s.layers) == (64, 2, 256, 12)
    with pytest.raises(ApolloError, match="head size"):
        small_shape(cfg("bert", 128, 4, 512, 12), hidden=48)
