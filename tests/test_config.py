import dataclasses

import pytest

from apollo.config import PRESET_NAMES, ApolloError, check, from_dict, load_yaml, preset, save_yaml, to_dict
from apollo.measure.flops import fixed_flops, forward_flops
from apollo.models import build_model, hf_config


def test_presets_roundtrip_yaml(tmp_path):
    for name in PRESET_NAMES:
        cfg = preset(name)
        check(cfg)
        save_yaml(cfg, tmp_path / f"{name}.yaml")
        assert load_yaml(tmp_path / f"{name}.yaml") == cfg


def test_paper_table5_sizes():
    sizes = {n: (preset(n).model.layers, preset(n).model.hidden, preset(n).model.heads) for n in PRESET_NAMES}
    assert sizes["bert-small"] == (12, 512, 8) and sizes["bert-base"] == (12, 768, 12)
    assert sizes["bert-large"] == (24, 1024, 16) and sizes["gpt-small"] == (12, 512, 8)
    assert sizes["gpt-base"] == (12, 768, 12)
    assert preset("bert-base").model.vocab == 30522 and preset("gpt-base").model.seq_len == 1024


@pytest.mark.parametrize("name", ["bert-tiny", "gpt-tiny", "roberta-tiny", "llama-tiny"])
def test_tiny_presets_let_layers_dominate(name):
    """Embeddings + LM head <= 1/4 of a full-depth step's FLOPs (cpu-scale-findings.md)."""
    m = preset(name).model
    assert m.layers == 12 and m.seq_len == 128
    hf = hf_config(m)
    tokens = 16 * m.seq_len
    assert fixed_flops(hf, tokens) <= 0.25 * forward_flops(hf, 12, tokens, m.seq_len)
    model = build_model(m, 12, seed=0)
    assert model.config.num_hidden_layers == 12


def test_from_dict_rejects_unknown_keys_and_bad_types():
    base = preset("bert-tiny")
    assert from_dict({"model": {"hidden": "256"}}, base).model.hidden == 256
    assert from_dict({"method": {"stages": "1,3,6,12"}}, base).method.stages == (1, 3, 6, 12)
    with pytest.raises(ApolloError, match=r"unknown config key model.hiden \(did you mean 'hidden'\?\)"):
        from_dict({"model": {"hiden": 3}}, base)
    with pytest.raises(ApolloError, match=r"unknown config key 'trian' \(did you mean 'train'\?\)"):
        from_dict({"trian": {}}, base)
    with pytest.raises(ApolloError, match=r"unknown config key 'zzz'$"):
        from_dict({"zzz": {}}, base)
    with pytest.raises(ApolloError, match="expected int"):
        from_dict({"train": {"batch_size": "many"}}, base)
    assert to_dict(base)["model"]["hidden"] == base.model.hidden


@pytest.mark.parametrize("section, change, match", [
    ("train", {"batch_size": 0}, "batch-size"), ("train", {"lr": -1.0}, "lr"), ("train", {"steps": -5}, "steps"),
    ("model", {"heads": 3}, "divisible"), ("train", {"steps": 0, "tokens": 0, "epochs": 0.0}, "run length"),
])
def test_check_rejects_unusable_values(section, change, match):
    cfg = preset("bert-tiny")
    cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **change)})
    with pytest.raises(ApolloError, match=match):
        check(cfg)


def test_roberta_and_llama_presets_build_their_hf_classes():
    roberta, llama = preset("roberta-tiny").model, preset("llama-tiny").model
    assert (roberta.layers, roberta.hidden, roberta.heads, roberta.vocab, roberta.seq_len) == (12, 128, 4, 4096, 128)
    assert (llama.layers, llama.hidden, llama.heads, llama.vocab, llama.seq_len, llama.ffn) == (12, 128, 4, 4096, 128,
                                                                                                  344)
    assert preset("llama-base").model.ffn == 2048 and preset("llama-base").model.vocab == 50257
    r = hf_config(roberta)
    # [PAD] is id 0 in our WordPiece tokenizer; positions 1..seq_len follow it
    assert (r.pad_token_id, r.max_position_embeddings, r.type_vocab_size) == (0, 129, 1)
    ll = hf_config(llama)
    assert (ll.intermediate_size, ll.num_key_value_heads, ll.max_position_embeddings) == (344, 4, 128)
    assert not ll.use_cache and not ll.tie_word_embeddings and ll.pad_token_id is None
    assert (ll.bos_token_id, ll.eos_token_id) == (0, 0)
    assert type(build_model(roberta, 1, 0)).__name__ == "RobertaForMaskedLM"
    assert type(build_model(llama, 1, 0)).__name__ == "LlamaForCausalLM"
    # llama-tiny's SwiGLU layers cost what gpt-tiny's 4h MLP layers do, within 1%
    gpt = hf_config(preset("gpt-tiny").model)
    assert abs(forward_flops(ll, 12, 2048, 128) / forward_flops(gpt, 12, 2048, 128) - 1) < 0.01


def test_check_rejects_an_unknown_arch():
    cfg = preset("bert-tiny")
    with pytest.raises(ApolloError, match=r"unknown --arch 't5' \(choose from bert, roberta, gpt2, llama\)"):
        check(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, arch="t5")))


def test_masked_archs_agree_with_the_adapter_table():
    from apollo.config import ARCHS, MASKED_ARCHS
    from apollo.models import ADAPTERS

    assert all(ADAPTERS[a].mlm == (a in MASKED_ARCHS) for a in ARCHS)
