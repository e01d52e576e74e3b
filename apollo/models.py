"""Presets -> Hugging Face models, and the layer adapter (where a model keeps its layer list).

The adapter is the only place that knows model internals: Apollo, StackBERT and the FLOP
counter all work through ``get_layers`` / ``set_layers`` and the ``ADAPTERS`` table.
"""

from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    RobertaConfig,
    RobertaForMaskedLM,
)

from .config import ARCHS, ApolloError, ModelConfig


@dataclass(frozen=True)
class Adapter:
    """Where one Hugging Face ``model_type`` keeps what apollo touches.

    Paths are attribute paths: ``layers`` and ``head`` from the LM model (``*ForMaskedLM`` / ``*ForCausalLM``),
    ``residual_outputs`` and ``post_ln`` from inside one layer. Config fields name the config's attributes.
    """

    layers: str  # the nn.ModuleList of transformer layers
    mlm: bool = False  # masked LM (BERT-style data and loss) or causal LM
    depth_field: str = "num_hidden_layers"  # the config field holding the layer count
    # The last projection of each residual branch (attention out, MLP out). Zeroing both turns a pre-LN layer
    # into the identity (function-preserving growth, ``new_layers="zeroed"``).
    residual_outputs: tuple[str, ...] = ()
    post_ln: tuple[str, ...] = ()  # post-LN only: the LayerNorms after the attention and FFN residual sums
    head: str = "lm_head"  # the LM head; the MLM loss runs it only at the masked positions
    head_dense: bool = False  # the head has an h x h transform before the decoder (BERT, RoBERTa)
    ffn_field: str = "intermediate_size"  # the config field holding the FFN width (unset: 4 x hidden)
    gated_mlp: bool = False  # SwiGLU-style MLP: gate, up and down projections (3 matrices, not 2)
    positions_after_pad: bool = False  # RoBERTa: position ids start at pad_token_id + 1


_BERT = Adapter("bert.encoder.layer", mlm=True, residual_outputs=("attention.output.dense", "output.dense"),
                post_ln=("attention.output.LayerNorm", "output.LayerNorm"), head="cls", head_dense=True)
_LLAMA = Adapter("model.layers", residual_outputs=("self_attn.o_proj", "mlp.down_proj"), gated_mlp=True)
# To support another architecture, add its model_type here (see Adapter for the fields).
ADAPTERS = types.MappingProxyType({
    "bert": _BERT,
    "roberta": dataclasses.replace(_BERT, layers="roberta.encoder.layer", head="lm_head", positions_after_pad=True),
    "gpt2": Adapter("transformer.h", depth_field="n_layer", residual_outputs=("attn.c_proj", "mlp.c_proj"),
                    ffn_field="n_inner"),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "opt": Adapter("model.decoder.layers", residual_outputs=("self_attn.out_proj", "fc2"), ffn_field="ffn_dim"),
    "gpt_neox": Adapter("gpt_neox.layers", residual_outputs=("attention.dense", "mlp.dense_4h_to_h"),
                        head="embed_out"),
})
# Config lists with one entry per layer (newer transformers, e.g. Qwen2's attention type per layer).
PER_LAYER_FIELDS = ("layer_types", "mlp_layer_types")


def adapter(model_type: str) -> Adapter:
    """The ``ADAPTERS`` entry of a model type, or a one-line error saying how to add one."""
    if model_type not in ADAPTERS:
        raise ApolloError(f"unknown model_type {model_type!r} (known: {', '.join(ADAPTERS)}); register it by adding "
                          f"{model_type!r}: Adapter(layers=..., depth_field=..., residual_outputs=..., post_ln=..., "
                          "head=..., ffn_field=...) to apollo.models.ADAPTERS")
    return ADAPTERS[model_type]


def model_adapter(model: nn.Module) -> Adapter:
    return adapter(getattr(getattr(model, "config", None), "model_type", type(model).__name__))


# Width growth (bert2BERT, LiGO): per model type, what each axis of each parameter indexes. Keys are parameter
# names, with "*" for a layer's prefix; an axis is "" (not grown: vocabulary, positions, layers), "h" (hidden
# units of the residual stream), "a" (attention units, grown head by head), "qkv" (GPT-2's fused q|k|v, three
# "a" blocks) or "f" (FFN units). A trailing "/" marks an axis whose copied units are divided by their copy
# count: a weight that reads a duplicated unit, or a LayerNorm feeding the tied output embedding.
WIDTH_AXES = {
    "gpt2": {
        "transformer.wte.weight": ("", "h"), "transformer.wpe.weight": ("", "h"),
        "*.ln_1.weight": ("h",), "*.ln_1.bias": ("h",),
        "*.attn.c_attn.weight": ("h/", "qkv"), "*.attn.c_attn.bias": ("qkv",),  # Conv1D weights are (in, out)
        "*.attn.c_proj.weight": ("a/", "h"), "*.attn.c_proj.bias": ("h",),
        "*.ln_2.weight": ("h",), "*.ln_2.bias": ("h",),
        "*.mlp.c_fc.weight": ("h/", "f"), "*.mlp.c_fc.bias": ("f",),
        "*.mlp.c_proj.weight": ("f/", "h"), "*.mlp.c_proj.bias": ("h",),
        "transformer.ln_f.weight": ("h/",), "transformer.ln_f.bias": ("h/",),
    },
    "bert": {
        "bert.embeddings.word_embeddings.weight": ("", "h"), "bert.embeddings.position_embeddings.weight": ("", "h"),
        "bert.embeddings.token_type_embeddings.weight": ("", "h"),
        "bert.embeddings.LayerNorm.weight": ("h",), "bert.embeddings.LayerNorm.bias": ("h",),
        **{f"*.attention.self.{n}.{w}": ("a", "h/") if w == "weight" else ("a",)
           for n in ("query", "key", "value") for w in ("weight", "bias")},
        "*.attention.output.dense.weight": ("h", "a/"), "*.attention.output.dense.bias": ("h",),
        "*.attention.output.LayerNorm.weight": ("h",), "*.attention.output.LayerNorm.bias": ("h",),
        "*.intermediate.dense.weight": ("f", "h/"), "*.intermediate.dense.bias": ("f",),
        "*.output.dense.weight": ("h", "f/"), "*.output.dense.bias": ("h",),
        "*.output.LayerNorm.weight": ("h",), "*.output.LayerNorm.bias": ("h",),
        "cls.predictions.bias": ("",),
        "cls.predictions.transform.dense.weight": ("h", "h/"), "cls.predictions.transform.dense.bias": ("h",),
        "cls.predictions.transform.LayerNorm.weight": ("h/",), "cls.predictions.transform.LayerNorm.bias": ("h/",),
    },
}


def hf_config(m: ModelConfig):
    """The HF config for a preset; eager-equivalent SDPA attention, no KV cache while training."""
    if m.arch == "bert":
        return BertConfig(vocab_size=m.vocab, hidden_size=m.hidden, num_hidden_layers=m.layers,
                          num_attention_heads=m.heads, intermediate_size=m.ffn, max_position_embeddings=m.seq_len,
                          hidden_dropout_prob=m.dropout, attention_probs_dropout_prob=m.dropout)
    if m.arch == "roberta":
        # Our WordPiece tokenizer: [PAD] 0, [CLS] 2, [SEP] 3 (data.BERT_SPECIALS). RoBERTa numbers positions from
        # pad_token_id + 1, so a block of seq_len tokens uses rows 1..seq_len: the table needs seq_len + 1 rows
        # (HF's 514 for 512 tokens is the same rule with pad_token_id 1). One token type, as in RoBERTa.
        return RobertaConfig(vocab_size=m.vocab, hidden_size=m.hidden, num_hidden_layers=m.layers,
                             num_attention_heads=m.heads, intermediate_size=m.ffn,
                             max_position_embeddings=m.seq_len + 1, type_vocab_size=1, pad_token_id=0, bos_token_id=2,
                             eos_token_id=3,
                             hidden_dropout_prob=m.dropout, attention_probs_dropout_prob=m.dropout)
    if m.arch == "gpt2":
        return GPT2Config(vocab_size=m.vocab, n_embd=m.hidden, n_layer=m.layers, n_head=m.heads, n_inner=m.ffn,
                          n_positions=m.seq_len, resid_pdrop=m.dropout, embd_pdrop=m.dropout, attn_pdrop=m.dropout,
                          bos_token_id=0, eos_token_id=0, use_cache=False)
    if m.arch == "llama":
        # RMSNorm, rotary positions, SwiGLU (intermediate_size = ffn), full multi-head attention, untied head
        # (LLaMA's default). bos = eos = the byte-level tokenizer's <|endoftext|> (id 0), as for GPT-2. No pad id:
        # LLaMA makes it the embedding's padding_idx, whose row never trains, and id 0 is the separator in our blocks.
        return LlamaConfig(vocab_size=m.vocab, hidden_size=m.hidden, num_hidden_layers=m.layers,
                           num_attention_heads=m.heads, num_key_value_heads=m.heads, intermediate_size=m.ffn,
                           max_position_embeddings=m.seq_len, attention_dropout=m.dropout, bos_token_id=0,
                           eos_token_id=0, pad_token_id=None, use_cache=False)
    raise ApolloError(f"unknown arch {m.arch!r} (choose from {', '.join(ARCHS)})")


def build_model(m: ModelConfig, live_layers: int, seed: int) -> PreTrainedModel:
    """A freshly initialised model whose layer list holds the first ``live_layers`` of an L-layer init.

    Building the full depth first means every method starts from the same embeddings, head and
    (first) layers for a given seed, and GPT-2's depth-scaled init uses the target depth L.
    """
    torch.manual_seed(seed)
    cls = {"bert": BertForMaskedLM, "roberta": RobertaForMaskedLM, "gpt2": GPT2LMHeadModel,
           "llama": LlamaForCausalLM}.get(m.arch)
    model = cls(hf_config(m)) if cls else hf_config(m)  # an unknown arch: hf_config's error
    if m.arch == "gpt2":
        model.loss_type = "ForCausalLM"  # HF cannot infer it from the class name and warns; this is its default
    if live_layers < m.layers:
        set_layers(model, nn.ModuleList(list(get_layers(model))[:live_layers]), source=list(range(live_layers)))
    return model


def layer_path(model: nn.Module) -> str:
    """Dotted attribute path of the model's layer list, e.g. ``bert.encoder.layer``."""
    path = model_adapter(model).layers
    obj = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
    if not isinstance(obj, nn.ModuleList):
        raise ApolloError(f"{type(model).__name__}: no layer list at {path} (its entry in apollo.models.ADAPTERS)")
    return path


def get_layers(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(layer_path(model))


def depth_state(config) -> dict[str, object]:
    """The config fields that describe the layer count (the depth field and per-layer lists), to restore later."""
    names = (adapter(config.model_type).depth_field, *PER_LAYER_FIELDS)
    return {n: getattr(config, n) for n in names if getattr(config, n, None) is not None}


def set_depth(config, n_layers: int, source: list[int] | None = None) -> None:
    """Set the config's layer count; per-layer lists (``layer_types``) keep one entry per layer.

    New layer ``j`` takes the entry of old layer ``source[j]``; without a source the entries must all be
    equal (the list is then resized), since there is no telling which layer an entry belongs to.
    """
    for name in PER_LAYER_FIELDS:
        values = getattr(config, name, None)
        if not isinstance(values, list | tuple):
            continue
        if source is not None:
            setattr(config, name, [values[i] for i in source])
        elif len(set(values)) <= 1:
            setattr(config, name, list(values[:1]) * n_layers)
        else:
            raise ApolloError(f"config.{name} differs between layers ({sorted(set(values))}); pass the source "
                              "layer of every new layer to set_layers")
    setattr(config, adapter(config.model_type).depth_field, n_layers)


def set_layers(model: nn.Module, layers: nn.ModuleList, depth_field: bool = True,
               source: list[int] | None = None) -> None:
    """Install ``layers`` as the model's layer list; with ``depth_field`` also update the config's depth.

    ``source[j]``: which old layer new layer ``j`` comes from (for per-layer config lists, see ``set_depth``).
    """
    *parents, name = layer_path(model).split(".")
    setattr(model.get_submodule(".".join(parents)), name, layers)
    if depth_field:
        set_depth(model.config, len(layers), source)


def residual_outputs(model: nn.Module, layer: nn.Module) -> list[nn.Module]:
    """The modules that write a layer's residual branches back into the stream (``Adapter.residual_outputs``)."""
    names = model_adapter(model).residual_outputs
    if not names:
        raise ApolloError(f"no residual-output projections known for model type {model.config.model_type!r}; "
                          "add them to its entry in apollo.models.ADAPTERS")
    return [layer.get_submodule(n) for n in names]


def width_key(model: nn.Module, name: str) -> str:
    """``name`` with a layer's prefix replaced by ``*`` (the key of WIDTH_AXES): ``*.attn.c_attn.weight``."""
    prefix = layer_path(model) + "."
    return "*." + name[len(prefix):].split(".", 1)[1] if name.startswith(prefix) else name


def width_axes(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """What each axis of each parameter indexes (see WIDTH_AXES), for width growth."""
    axes = WIDTH_AXES.get(model.config.model_type)
    if axes is None:
        raise ApolloError(f"width growth knows no parameter layout for model type {model.config.model_type!r}; "
                          "add it to apollo.models.WIDTH_AXES")
    return axes


def max_tokens(config) -> int:
    """The longest input the position table takes (RoBERTa's positions start after the pad id)."""
    n = getattr(config, "max_position_embeddings", None) or config.n_positions
    return n - config.pad_token_id - 1 if adapter(config.model_type).positions_after_pad else n


def renumber_layers(layers: nn.ModuleList) -> None:
    """Give each distinct layer its position as ``layer_idx`` (used by KV caches) after a rebuild."""
    for i, layer in enumerate(layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = i


def lm_loss(model: PreTrainedModel, batch: dict[str, torch.Tensor], mlm: bool) -> torch.Tensor:
    """The LM loss of ``batch``; for MLM the prediction head runs only over the masked positions.

    HF's ``BertForMaskedLM`` / ``RobertaForMaskedLM`` apply their head (dense h x h + LayerNorm + h x V
    decoder) at every position and then ignore ~85% of them in the loss. Selecting the labelled positions
    first gives the same loss (the head is per-position) for ~15% of the head's cost, which matters for growth
    schedules: the head is a fixed cost that does not shrink with the executed depth.
    """
    if not mlm:
        return model(**batch).loss
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = model.base_model(**inputs).last_hidden_state
    keep = labels != -100
    logits = model.get_submodule(model_adapter(model).head)(hidden[keep])
    return F.cross_entropy(logits, labels[keep], reduction="sum") / keep.sum().clamp(min=1)


class LMLoss(nn.Module):
    """``lm_loss`` as a module's forward: DistributedDataParallel must see each forward pass, and LiGO's
    ``functional_call`` swaps weights in by parameter name (``model.*``)."""

    def __init__(self, model: nn.Module, mlm: bool):
        super().__init__()
        self.model, self.mlm = model, mlm

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return lm_loss(self.model, batch, self.mlm)
