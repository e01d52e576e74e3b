"""bert2BERT: FPI is function-preserving (width, depth, both); AKI changes exactly the new units of lower layers.
The same for the LLaMA family (grouped-query attention, RMSNorm, SwiGLU; tied or untied head)."""

import dataclasses

import pytest
import torch
from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config, RobertaConfig, RobertaForMaskedLM

from apollo.baselines.bert2bert import bert2bert, check_small, expand, load_small, small_shape, widen, width_map
from apollo.config import ApolloError, ModelConfig
from apollo.models import build_model, get_layers, layer_path, width_axes, width_key

# (hidden, heads, ffn, layers): head size 8 throughout; FFN 24 -> 64 is not a multiple (random copies).
SMALL = (16, 2, 24, 2)
CASES = {"width": (32, 4, 64, 2), "depth": (16, 2, 24, 5), "both": (32, 4, 64, 4), "width x3": (48, 6, 64, 2)}


def cfg(arch, hidden, heads, ffn, layers) -> ModelConfig:
    return ModelConfig(arch, layers, hidden, heads, ffn, 100, 16, 0.0)


def trained_like(arch, shape=SMALL, seed=1, model=None):
    """A small model with every weight moved away from its init (LayerNorms included), as a trained one would be."""
    model = (model or build_model(cfg(arch, *shape), shape[3], seed)).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model


def logits(model, seed=2, dtype=torch.float64):
    """Logits computed in float64, so the comparison sees the grown weights, not float32 summation order."""
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval().to(dtype)(input_ids=ids).logits


# The LLaMA family through --model-config: tiny configs written with transformers' own config classes.
# (hidden, heads, key/value heads, ffn, layers): head size 8, two query heads per key/value head.
LLAMA_FAMILY = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}
GQA_SMALL = (32, 4, 2, 64, 2)
GQA_CASES = {"width": (64, 8, 4, 128, 2), "both": (64, 8, 4, 128, 4)}


def gqa_cfg(tmp_path, model_type, shape=GQA_SMALL, tie=False) -> ModelConfig:
    """A ``--model-config`` ModelConfig at ``shape``, its config.json written by the model type's config class (its
    own layer count, so per-layer lists such as Qwen's ``layer_types`` have the right length)."""
    hidden, heads, kv, ffn, layers = shape
    path = tmp_path / f"{model_type}-{'-'.join(map(str, shape))}-{'tied' if tie else 'untied'}"
    if not path.exists():
        LLAMA_FAMILY[model_type](vocab_size=64, hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv,
                                 intermediate_size=ffn, num_hidden_layers=layers, head_dim=hidden // heads,
                                 max_position_embeddings=16, tie_word_embeddings=tie).save_pretrained(path)
    return ModelConfig(model_type, layers, hidden, heads, ffn, 64, 16, 0.0, model_config=str(path))


def gqa_trained_like(tmp_path, model_type, shape=GQA_SMALL, tie=False):
    m = gqa_cfg(tmp_path, model_type, shape, tie)
    return trained_like(model_type, model=build_model(m, m.layers, seed=1))


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


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("case", list(GQA_CASES))
@pytest.mark.parametrize("model_type", list(LLAMA_FAMILY))
def test_fpi_preserves_the_function_of_the_llama_family(tmp_path, model_type, case, tie):
    small = gqa_trained_like(tmp_path, model_type, tie=tie)
    hidden, heads, kv, ffn, layers = GQA_CASES[case]
    big = bert2bert(small, gqa_cfg(tmp_path, model_type, GQA_CASES[case], tie), "fpi", "zeroed", seed=0)
    c = big.config
    assert (c.model_type, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size,
            c.num_hidden_layers, c.tie_word_embeddings) == (model_type, hidden, heads, kv, ffn, layers, tie)
    assert len(get_layers(big)) == layers and get_layers(big)[0].self_attn.k_proj.weight.shape == (kv * 8, hidden)
    torch.testing.assert_close(logits(big), logits(small), atol=1e-5, rtol=0)
    # and in the float32 the model trains in, up to float32 rounding (the logits are of size ~5)
    torch.testing.assert_close(logits(big, dtype=torch.float32), logits(small, dtype=torch.float32), atol=1e-4, rtol=0)


def test_gqa_width_map_copies_query_heads_with_their_key_value_head():
    small = Qwen3Config(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=64)
    big = Qwen3Config(hidden_size=96, num_attention_heads=12, num_key_value_heads=6, head_dim=8, intermediate_size=96)
    wmap = width_map(small, big, seed=0)
    heads, kv = wmap.index["a"].view(12, 8), wmap.index["kv"].view(6, 8)  # whole heads: rows of 8 units
    assert heads[:4].flatten().tolist() == list(range(32)) and kv[:2].flatten().tolist() == list(range(16))
    assert all(row.tolist() == list(range(int(row[0]), int(row[0]) + 8)) for row in (*heads, *kv))
    q_src, kv_src = heads[:, 0] // 8, kv[:, 0] // 8
    assert (q_src // 2 == kv_src[torch.arange(12) // 2]).all()  # query head i reads kv head i // 2, as its source
    assert len(set(kv_src[2:].tolist())) > 1 and wmap.counts["a"].sum() == 96 and wmap.counts["kv"].sum() == 48
    assert wmap.new["a"].sum() == 64 and wmap.new["kv"].sum() == 32 and wmap.new["h"].sum() == 64
    with pytest.raises(ApolloError, match="group size differs"):
        width_map(small, Qwen3Config(hidden_size=64, num_attention_heads=8, num_key_value_heads=8, head_dim=8), 0)


def assert_aki_changes_exactly_the_new_units_of_lower_layers(small, big_cfg):
    target = build_model(big_cfg, 3, 0)
    wmap = width_map(small.config, target.config, seed=0)
    fpi, aki = widen(small, target, wmap, "fpi"), widen(small, target, wmap, "aki")
    axes = width_axes(target)
    changed, prefix = 0, layer_path(target) + "."
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


def test_aki_changes_exactly_the_new_units_of_lower_layers(arch):
    small = trained_like(arch, (16, 2, 24, 3))
    assert_aki_changes_exactly_the_new_units_of_lower_layers(small, cfg(arch, 32, 4, 64, 3))


@pytest.mark.parametrize("model_type", list(LLAMA_FAMILY))
def test_aki_changes_exactly_the_new_units_of_lower_layers_of_the_llama_family(tmp_path, model_type):
    small = gqa_trained_like(tmp_path, model_type, (32, 4, 2, 64, 3))
    assert_aki_changes_exactly_the_new_units_of_lower_layers(small, gqa_cfg(tmp_path, model_type, (64, 8, 4, 128, 3)))


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


@pytest.mark.parametrize("shape, tie, message", [
    ((64, 8, 8, 128, 2), False, "group size differs"),  # 2 query heads per key/value head -> 1
    ((64, 4, 2, 128, 2), False, "head size differs"),
    ((64, 8, 4, 48, 2), False, "larger than the target"),
    ((64, 8, 4, 128, 2), True, "tied"),
])
def test_llama_family_small_model_that_cannot_grow_is_refused(tmp_path, shape, tie, message):
    small = build_model(gqa_cfg(tmp_path, "qwen3"), 2, 0).config
    with pytest.raises(ApolloError, match=message):
        check_small(small, gqa_cfg(tmp_path, "qwen3", shape, tie))


def test_load_small_needs_a_saved_model(tmp_path):
    with pytest.raises(ApolloError, match="no trained model"):
        load_small(tmp_path, cfg("bert", 64, 4, 128, 12))
    model = build_model(cfg("gpt2", 32, 2, 64, 2), 2, 0)
    model.save_pretrained(tmp_path / "model")
    assert load_small(tmp_path, cfg("gpt2", 64, 4, 128, 12)).config.hidden_size == 32


@pytest.mark.parametrize("model_type", list(LLAMA_FAMILY))
def test_load_small_loads_the_llama_family_through_the_auto_classes(tmp_path, model_type):
    small = build_model(gqa_cfg(tmp_path, model_type), 2, 0)
    small.save_pretrained(tmp_path / "run" / "model")
    loaded = load_small(tmp_path / "run", gqa_cfg(tmp_path, model_type, GQA_CASES["width"]))
    assert type(loaded) is type(small) and loaded.config.num_key_value_heads == 2


def test_unsupported_model_types_are_refused_in_one_line(tmp_path):
    for target in (cfg("roberta", 64, 4, 128, 2), ModelConfig("bert", 2, 64, 4, 128, 100, 16, 0.0,
                                                              model_config=str(tmp_path / "roberta"))):
        RobertaConfig().save_pretrained(tmp_path / "roberta")
        for call in (lambda t=target: load_small(tmp_path, t), lambda t=target: small_shape(t)):
            with pytest.raises(ApolloError, match="supports for gpt2, bert, llama, .* only, not roberta") as e:
                call()
            assert "\n" not in str(e.value)
    RobertaForMaskedLM(RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64)).save_pretrained(tmp_path / "model")
    with pytest.raises(ApolloError, match="model type 'roberta' \\(need one of gpt2, bert, llama") as e:
        load_small(tmp_path, cfg("bert", 64, 4, 128, 2))
    assert "\n" not in str(e.value)


def test_small_shape_halves_width_and_keeps_head_size():
    s = small_shape(cfg("bert", 128, 4, 512, 12))
    assert (s.hidden, s.heads, s.ffn, s.layers) == (64, 2, 256, 12)
    with pytest.raises(ApolloError, match="head size"):
        small_shape(cfg("bert", 128, 4, 512, 12), hidden=48)


def test_small_shape_keeps_the_key_value_group_size(tmp_path):
    target = gqa_cfg(tmp_path, "mistral", GQA_CASES["width"])
    s = small_shape(target)
    assert (s.hidden, s.heads, s.ffn, s.model_config) == (32, 4, 64, target.model_config)
    assert build_model(s, 2, 0).config.num_key_value_heads == 2
    with pytest.raises(ApolloError, match="query heads per key/value head"):
        small_shape(target, hidden=8)  # one head: half a group
