"""The analytic FLOP formulas against torch's FlopCounterMode on tiny real Hugging Face models.

Eager attention is used because FlopCounterMode does not count CPU SDPA flash attention.
"""

from functools import cache

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    OPTConfig,
    Qwen2Config,
    RobertaConfig,
    RobertaForMaskedLM,
    T5Config,
)

from apollo.config import ApolloError
from apollo.measure.flops import fixed_flops, forward_flops, layer_flops, train_flops

HIDDEN, HEADS, FFN, VOCAB, SEQ, BATCH = 64, 4, 256, 512, 32, 2
LLAMA_FFN = 176  # 8/3 x hidden rounded up to a multiple of 8, as in the llama-tiny preset
TOKENS = BATCH * SEQ
REL_TOL = 0.02
ARCHS = ["bert", "gpt2", "roberta", "llama"]
CLASSES = {"bert": BertForMaskedLM, "gpt2": GPT2LMHeadModel, "roberta": RobertaForMaskedLM, "llama": LlamaForCausalLM}


def make_config(arch: str, depth: int):
    if arch == "bert":
        config = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=depth, num_attention_heads=HEADS,
                            intermediate_size=FFN, max_position_embeddings=SEQ, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)
    elif arch == "roberta":  # as models.hf_config: positions after pad id 0, one token type
        config = RobertaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=depth, num_attention_heads=HEADS,
                               intermediate_size=FFN, max_position_embeddings=SEQ + 1, type_vocab_size=1,
                               pad_token_id=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    elif arch == "llama":
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=depth, num_attention_heads=HEADS,
                             intermediate_size=LLAMA_FFN, max_position_embeddings=SEQ, bos_token_id=0, eos_token_id=0,
                             use_cache=False)
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
    model = CLASSES[arch](config)
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
@pytest.mark.parametrize("arch", ARCHS)
def test_forward_flops_match_flop_counter(arch, depth):
    got = measured(arch, depth, train=False)
    assert got > 0
    assert rel_err(forward_flops(make_config(arch, depth), depth, TOKENS, SEQ), got) < REL_TOL


@pytest.mark.parametrize("depth", [1, 3, 12])
@pytest.mark.parametrize("arch", ARCHS)
def test_train_flops_match_flop_counter(arch, depth):
    got = measured(arch, depth, train=True)
    assert got > 2 * measured(arch, depth, train=False)  # the backward really was counted
    assert rel_err(train_flops(make_config(arch, depth), depth, TOKENS, SEQ), got) < REL_TOL


@pytest.mark.parametrize("arch", ARCHS)
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
    with pytest.raises(ApolloError, match=r"^the FLOP formula knows bert, .*, not 't5'; train_flops and StepFlops"):
        layer_flops(T5Config(), TOKENS, SEQ)
    with pytest.raises(ValueError, match="depth"):
        forward_flops(make_config("bert", 1), -1, TOKENS, SEQ)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("live, depth, kind", [(1, 5, "interpolation"), (3, 8, "interpolation"),
                                               (6, 12, "interpolation"), (3, 12, "stacking"), (4, 10, "middle"),
                                               (0, 0, "interpolation")])
def test_shared_layer_step_costs_its_executed_depth(arch, live, depth, kind):
    """What the trainer counts for a step at depth d with N live layers is what that step executes."""
    from apollo.method.growth import layer_map, shared_layers
    from apollo.models import get_layers, set_layers

    torch.manual_seed(0)
    model = CLASSES[arch](make_config(arch, live))
    set_layers(model, torch.nn.ModuleList(list(get_layers(model))[:live]))
    ids = torch.randint(5, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        with shared_layers(model, layer_map(kind, live, depth)):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    expected = train_flops(model.config, depth, TOKENS, SEQ)
    assert abs(counter.get_total_flops() - expected) <= REL_TOL * expected


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_sparse_mlm_head_flops_match_flop_counter(arch):
    """apollo's MLM loss runs the head only at masked positions; the formula counts exactly those."""
    from apollo.models import lm_loss

    torch.manual_seed(0)
    config = make_config(arch, 3)
    model = CLASSES[arch](config).train()
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


def test_llama_hand_computed_values():
    """LLaMA (h=64, f=176, V=512, s=32, 64 tokens): q, o and k, v projections, scores, SwiGLU's 3 matrices."""
    per_token_layer = 4 * 64 * 64 + 4 * 64 * 64 + 4 * 32 * 64 + 3 * 2 * 64 * 176  # 16384 + 16384 + 8192 + 67584
    llama = make_config("llama", 3)
    assert layer_flops(llama, TOKENS, SEQ) == 64 * per_token_layer == 6_815_744 + 64 * (67584 - 65536)
    assert fixed_flops(llama, TOKENS) == 64 * 2 * 512 * 64  # lm_head only, no transform
    assert fixed_flops(make_config("roberta", 3), TOKENS) == fixed_flops(make_config("bert", 3), TOKENS)
    gqa = LlamaConfig(**{**llama.to_dict(), "num_key_value_heads": 2})  # k, v shrink to 2 heads of 16
    assert layer_flops(llama, 1, SEQ) - layer_flops(gqa, 1, SEQ) == 2 * 2 * 64 * (64 - 32)


def _other(kind: str, depth: int):
    """Tiny models of the other registered architectures (eager attention)."""
    common = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": depth, "num_attention_heads": HEADS,
              "max_position_embeddings": SEQ, "bos_token_id": 0, "eos_token_id": 0, "use_cache": False}
    config = {
        "mistral": lambda: MistralConfig(**common, intermediate_size=LLAMA_FFN, num_key_value_heads=2),
        "qwen2": lambda: Qwen2Config(**common, intermediate_size=LLAMA_FFN, num_key_value_heads=2),
        "opt": lambda: OPTConfig(**common, ffn_dim=FFN, word_embed_proj_dim=HIDDEN, pad_token_id=1),
        "gpt_neox": lambda: GPTNeoXConfig(**common, intermediate_size=FFN),
        "llama-gqa": lambda: LlamaConfig(**common, intermediate_size=LLAMA_FFN, num_key_value_heads=1),
    }[kind]()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager")


@pytest.mark.parametrize("kind", ["mistral", "qwen2", "opt", "gpt_neox", "llama-gqa"])
def test_registered_architectures_count_their_flops_at_a_shared_depth(kind):
    """Every ADAPTERS entry finds its layers, and a 2-live-layer step at depth 5 costs what the formula says
    (grouped-query attention included); Mistral and Qwen2 slice their layers by the config's depth."""
    from apollo.method.growth import layer_map, shared_layers
    from apollo.models import get_layers

    model = _other(kind, 2)
    assert len(get_layers(model)) == 2
    ids = torch.randint(5, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        with shared_layers(model, layer_map("interpolation", 2, 5)):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    assert rel_err(train_flops(model.config, 5, TOKENS, SEQ), counter.get_total_flops()) < REL_TOL
    assert model.config.num_hidden_layers == 2 and len(getattr(model.config, "layer_types", None) or [0, 0]) == 2

