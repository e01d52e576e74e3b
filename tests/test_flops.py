"""The analytic FLOP formulas against torch's FlopCounterMode on tiny real Hugging Face models.

Eager attention is used because FlopCounterMode does not count CPU SDPA flash attention.
"""

from functools import cache

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, LlamaConfig

from apollo.flops import fixed_flops, forward_flops, layer_flops, train_flops

HIDDEN, HEADS, FFN, VOCAB, SEQ, BATCH = 64, 4, 256, 512, 32, 2
TOKENS = BATCH * SEQ
REL_TOL = 0.02


def make_config(arch: str, depth: int):
    if arch == "bert":
        config = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=depth, num_attention_heads=HEADS,
                            intermediate_size=FFN, max_position_embeddings=SEQ, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)
    else:
        config = GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=depth, n_head=HEADS, n_inner=FFN, n_positions=SEQ,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                            use_cache=False)
    config._attn_implementation = "eager"
    return config


@cache
def measured(arch: str, depth: int, train: bool) -> int:
    """FlopCounterMode total for one forward (``train=False``) or forward + backward step."""
    torch.manual_seed(0)
    config = make_config(arch, depth)
    model = (BertForMaskedLM if arch == "bert" else GPT2LMHeadModel)(config)
    assert model.config._attn_implementation == "eager"
    assert model.config.num_hidden_layers == depth
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    counter = FlopCounterMode(display=False)
    if train:
        model.train()
        with counter:
            model(input_ids=ids, labels=ids).loss.backward()
    else:
        model.eval()
        with torch.no_grad(), counter:
            model(input_ids=ids)
    return counter.get_total_flops()


def rel_err(analytic: int, measured_flops: int) -> float:
    return abs(analytic - measured_flops) / measured_flops


@pytest.mark.parametrize("depth", [1, 3, 12])
@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_forward_flops_match_flop_counter(arch, depth):
    got = measured(arch, depth, train=False)
    assert got > 0
    assert rel_err(forward_flops(make_config(arch, depth), depth, TOKENS, SEQ), got) < REL_TOL


@pytest.mark.parametrize("depth", [1, 3, 12])
@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_train_flops_match_flop_counter(arch, depth):
    got = measured(arch, depth, train=True)
    assert got > 2 * measured(arch, depth, train=False)  # the backward really was counted
    assert rel_err(train_flops(make_config(arch, depth), depth, TOKENS, SEQ), got) < REL_TOL


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_depth_difference_is_per_layer_cost(arch):
    config = make_config(arch, 12)
    per_layer = layer_flops(config, TOKENS, SEQ)
    analytic = train_flops(config, 12, TOKENS, SEQ) - train_flops(config, 1, TOKENS, SEQ)
    assert analytic == 11 * 3 * per_layer
    got = measured(arch, 12, train=True) - measured(arch, 1, train=True)
    assert rel_err(analytic, got) < REL_TOL


def test_hand_computed_values():
    """Independent arithmetic for the tiny configs (h=64, f=256, V=512, s=32, 64 tokens)."""
    per_token_layer = 8 * 64 * 64 + 4 * 32 * 64 + 4 * 64 * 256  # 32768 + 8192 + 65536
    bert, gpt2 = make_config("bert", 3), make_config("gpt2", 3)
    assert layer_flops(bert, TOKENS, SEQ) == layer_flops(gpt2, TOKENS, SEQ) == 64 * per_token_layer == 6_815_744
    assert fixed_flops(bert, TOKENS) == 64 * (2 * 512 * 64 + 2 * 64 * 64) == 4_718_592
    assert fixed_flops(gpt2, TOKENS) == 64 * 2 * 512 * 64 == 4_194_304
    assert train_flops(gpt2, 3, TOKENS, SEQ) == 3 * (3 * 6_815_744 + 4_194_304)
    assert forward_flops(bert, 0, TOKENS, SEQ) == fixed_flops(bert, TOKENS)


def test_gpt2_default_ffn_is_four_hidden():
    config = GPT2Config(n_embd=64, n_head=4, n_inner=None, vocab_size=512)
    explicit = GPT2Config(n_embd=64, n_head=4, n_inner=256, vocab_size=512)
    assert layer_flops(config, TOKENS, SEQ) == layer_flops(explicit, TOKENS, SEQ)


def test_attention_scores_grow_with_sequence_length():
    config = make_config("gpt2", 1)
    # Same token count, longer sequences: only the QK^T / AV term changes, by 2*2*h per token per extra position.
    assert layer_flops(config, 128, 64) - layer_flops(config, 128, 32) == 128 * 4 * 32 * HIDDEN


def test_unknown_model_type_raises():
    with pytest.raises(ValueError, match="llama"):
        layer_flops(LlamaConfig(), TOKENS, SEQ)
    with pytest.raises(ValueError, match="depth"):
        forward_flops(make_config("bert", 1), -1, TOKENS, SEQ)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
@pytest.mark.parametrize("live, depth", [(1, 5), (3, 8), (6, 12)])
def test_shared_layer_step_costs_its_executed_depth(arch, live, depth):
    """What the trainer counts for a step at depth d with N live layers is what that step executes."""
    from apollo.growth import layer_map, shared_layers
    from apollo.models import get_layers, set_layers

    torch.manual_seed(0)
    model = (BertForMaskedLM if arch == "bert" else GPT2LMHeadModel)(make_config(arch, live))
    set_layers(model, torch.nn.ModuleList(list(get_layers(model))[:live]))
    ids = torch.randint(5, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        with shared_layers(model, layer_map("interpolation", live, depth)):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    expected = train_flops(model.config, depth, TOKENS, SEQ)
    assert abs(counter.get_total_flops() - expected) <= REL_TOL * expected


def test_sparse_mlm_head_flops_match_flop_counter():
    """apollo's MLM loss runs BERT's head only at masked positions; the formula counts exactly those."""
    from apollo.models import lm_loss

    torch.manual_seed(0)
    config = make_config("bert", 3)
    model = BertForMaskedLM(config).train()
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    labels = torch.full_like(ids, -100)
    labels[:, ::5] = ids[:, ::5]  # 7 of 32 positions per row are predicted
    head_tokens = int((labels != -100).sum())
    counter = FlopCounterMode(display=False)
    with counter:
        lm_loss(model, {"input_ids": ids, "labels": labels}, mlm=True).backward()
    got = counter.get_total_flops()
    assert rel_err(train_flops(config, 3, TOKENS, SEQ, head_tokens), got) < REL_TOL
    assert train_flops(config, 3, TOKENS, SEQ, head_tokens) < train_flops(config, 3, TOKENS, SEQ)
