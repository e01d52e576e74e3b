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
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
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
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

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
PER_LAYER_FIELDS = ("layer_types", "mlp_layer_types", "attention_window")


def adapter(model_type: str) -> Adapter:
    """The ``ADAPTERS`` entry of a registered model type (the presets' and the width-growth architectures')."""
    if model_type not in ADAPTERS:
        raise ApolloError(f"model_type {model_type!r} is not in apollo.models.ADAPTERS (registered: "
                          f"{', '.join(ADAPTERS)}); any other model is inspected (models.inspect_adapter)")
    return ADAPTERS[model_type]


def model_adapter(model: nn.Module) -> Adapter:
    """The model's ``ADAPTERS`` entry (an override), else what inspecting the model finds: once per model object
    (kept on it; growth and shared passes swap the layer list's contents, never where it lives)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ADAPTERS:
        return ADAPTERS[model_type]
    if "_apollo_adapter" not in model.__dict__:
        model.__dict__["_apollo_adapter"] = inspect_adapter(model)
    return model.__dict__["_apollo_adapter"]


# ---- inspection: where an unregistered Hugging Face model keeps what apollo touches ------------------------------


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _layer_list(model: nn.Module) -> str:
    """The ``nn.ModuleList`` of identical blocks that holds most parameters, or a one-line error saying why none
    can be grown (encoder-decoder, blocks split over parallel lists, blocks of different shapes)."""
    name = type(model).__name__
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise ApolloError(f"{name} is an encoder-decoder (two layer stacks); apollo grows one layer list")
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0 and n]
    if not lists:
        raise ApolloError(f"{name} has no nn.ModuleList of layers")
    path, layers = max(lists, key=lambda nm: _n_params(nm[1]))
    parallel = [n for n, m in lists if len(m) == len(layers) and n != path and not n.startswith(path + ".")
                and not path.startswith(n + ".") and _n_params(m) > 0.1 * _n_params(layers)]
    if parallel:
        raise ApolloError(f"{name} splits each layer over parallel lists ({path}, {', '.join(parallel)}); apollo "
                          "grows one list of whole layers")
    shapes = {tuple((k, tuple(v.shape)) for k, v in m.state_dict().items()) for m in layers}
    if len({type(m) for m in layers}) > 1 or len(shapes) > 1:
        raise ApolloError(f"{name}'s layers in {path} differ in type or shape; apollo copies layers into each "
                          "other's places, so they must be identical blocks")
    return path


def find_depth_field(config, n_layers: int | None = None) -> str:
    """The config field holding the layer count: the registered one, ``num_hidden_layers`` (HF's standard name,
    aliased by ``attribute_map``), else the one integer field named ``*layer*`` whose value is ``n_layers``."""
    if config.model_type in ADAPTERS:
        return ADAPTERS[config.model_type].depth_field
    if n_layers is None or getattr(config, "num_hidden_layers", None) == n_layers:
        if getattr(config, "num_hidden_layers", None) is not None:
            return "num_hidden_layers"
    if n_layers is None and getattr(config, "sub_configs", None):
        raise ApolloError(f"{config.model_type} is a composite (e.g. multimodal) config with no layer count of its "
                          f"own; pass its language model's config ({', '.join(config.sub_configs)})")
    found = [k for k, v in vars(config).items() if "layer" in k and type(v) is int and v == n_layers]
    if len(found) != 1:
        raise ApolloError(f"{config.model_type}: no single config field holds the layer count {n_layers} "
                          f"(candidates: {', '.join(found) or 'none'}; are layer weights shared across depth?)")
    return found[0]


def per_layer_fields(config, n_layers: int) -> tuple[str, ...]:
    """Config lists with one entry per layer (``layer_types``, ...): the known names, and any list field named
    ``*layer*`` as long as the depth."""
    return tuple(k for k, v in vars(config).items() if isinstance(v, list | tuple) and len(v) == n_layers
                 and (k in PER_LAYER_FIELDS or "layer" in k))


def _out_dim(module: nn.Module) -> int | None:
    """Output width of a linear map (``nn.Linear`` or GPT-2's transposed ``Conv1D``), else None."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.nf
    return None


def _residual_outputs(layer: nn.Module, hidden: int) -> tuple[str, ...]:
    """The last hidden-wide linear map of each branch (direct child) of a layer: attention out, MLP out."""
    found = []
    for name, branch in layer.named_children():
        last = [n for n, m in branch.named_modules() if _out_dim(m) == hidden]
        if last:
            found.append(f"{name}.{last[-1]}" if last[-1] else name)
    return tuple(found)


def _head(model: nn.Module) -> str:
    """The top-level module that holds the output embedding (the LM head) when it is the one module besides the
    backbone; "" when the head is spread over several modules (the loss then runs the whole model)."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = getattr(model, "base_model", None)
    rest = [(n, c) for n, c in model.named_children() if c is not base and _n_params(c) > 0]
    if out is None or len(rest) != 1 or not any(m is out for m in rest[0][1].modules()):
        return ""
    return rest[0][0]


def inspect_adapter(model: nn.Module) -> Adapter:
    """An ``Adapter`` for a model apollo has no entry for, found by inspecting it (see each helper)."""
    path = _layer_list(model)
    layers = model.get_submodule(path)
    config = model.config
    return Adapter(layers=path, mlm=type(model).__name__ in MODEL_FOR_MASKED_LM_MAPPING_NAMES.values(),
                   depth_field=find_depth_field(config, len(layers)),
                   residual_outputs=_residual_outputs(layers[0], config.hidden_size), head=_head(model))


def lm_class(config) -> type:
    """The Auto class that builds a config's LM: its masked LM if transformers has one (encoders), else its
    causal LM."""
    if getattr(config, "is_encoder_decoder", False):
        raise ApolloError(f"{config.model_type} is an encoder-decoder (two layer stacks); apollo grows one layer list")
    for mapping, auto in ((MODEL_FOR_MASKED_LM_MAPPING_NAMES, AutoModelForMaskedLM),
                          (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, AutoModelForCausalLM)):
        if config.model_type in mapping:
            return auto
    raise ApolloError(f"model type {config.model_type!r} has no causal-LM or masked-LM class in transformers")


# Width growth (bert2BERT, LiGO): per model type, what each axis of each parameter indexes. Keys are parameter
# names, with "*" for a layer's prefix; an axis is "" (not grown: vocabulary, positions, layers), "h" (hidden
# units of the residual stream), "a" (attention units, grown head by head), "kv" (key/value units of grouped-query
# attention, grown head by head with their query heads), "qkv" (GPT-2's fused q|k|v, three "a" blocks) or "f" (FFN
# units). A trailing "/" marks an axis whose copied units are divided by their copy count: a weight that reads a
# duplicated unit, or the norm feeding the output embedding (tied in GPT-2 and BERT; in the LLaMA family tied or
# not, so one layout serves both).
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
    # RMSNorm (no bias), rotary positions (no table), SwiGLU MLP; optional biases (Qwen2's q/k/v, LLaMA's
    # attention_bias / mlp_bias); Qwen3's per-head q_norm / k_norm act over head_dim, which is not grown.
    **{model_type: {
        "model.embed_tokens.weight": ("", "h"), "lm_head.weight": ("", "h"),
        "*.input_layernorm.weight": ("h",), "*.post_attention_layernorm.weight": ("h",),
        **{f"*.self_attn.{n}_proj.{w}": (space, "h/") if w == "weight" else (space,)
           for n, space in (("q", "a"), ("k", "kv"), ("v", "kv")) for w in ("weight", "bias")},
        "*.self_attn.o_proj.weight": ("h", "a/"), "*.self_attn.o_proj.bias": ("h",),
        "*.self_attn.q_norm.weight": ("",), "*.self_attn.k_norm.weight": ("",),
        **{f"*.mlp.{n}_proj.{w}": ("f", "h/") if w == "weight" else ("f",) for n in ("gate", "up")
           for w in ("weight", "bias")},
        "*.mlp.down_proj.weight": ("h", "f/"), "*.mlp.down_proj.bias": ("h",),
        "model.norm.weight": ("h/",),
    } for model_type in ("llama", "mistral", "qwen2", "qwen3")},
}


def load_hf_config(source: str):
    """A Hugging Face config from a ``config.json``, a directory holding one, or an ``AutoConfig`` name (those
    need internet)."""
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError, KeyError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ApolloError(f"--model-config {source}: {reason}") from None


# ModelConfig field -> the HF config fields it sets (the first the config has; HF's attribute_map aliases
# GPT-2's n_embd / n_layer / n_head / n_positions to the standard names).
SIZE_FIELDS = {"layers": ("num_hidden_layers",), "hidden": ("hidden_size",), "heads": ("num_attention_heads",),
               "ffn": ("intermediate_size", "n_inner", "ffn_dim", "d_ff"), "vocab": ("vocab_size",),
               "seq_len": ("max_position_embeddings", "n_positions")}


def _has(config, name: str) -> bool:
    return name in vars(config) or name in getattr(config, "attribute_map", {})


def sizes_of(config) -> dict[str, int]:
    """The depth and width a Hugging Face config describes (layers, hidden, heads, ffn; an unset FFN width is
    4 x hidden). Vocabulary and block length stay apollo's: the tokenizer and the data are apollo's own."""
    found = {k: getattr(config, next(n for n in SIZE_FIELDS[k] if _has(config, n)), None)
             for k in ("layers", "hidden", "heads", "ffn") if any(_has(config, n) for n in SIZE_FIELDS[k])}
    sizes = {k: v for k, v in found.items() if isinstance(v, int) and v > 0}
    if "hidden" in sizes and "ffn" not in sizes:
        sizes["ffn"] = 4 * sizes["hidden"]
    return sizes


def resolve_model(m: ModelConfig) -> ModelConfig:
    """With ``--model-config``: ``arch`` becomes its model_type, once the config loads and has an LM class."""
    if not m.model_config:
        return m
    config = load_hf_config(m.model_config)
    lm_class(config)
    return dataclasses.replace(m, arch=config.model_type)


def sized_hf_config(m: ModelConfig):
    """``m.model_config``'s architecture at ``m``'s sizes: each size sets the config field that holds it (key/value
    heads keep their ratio to the heads, an explicit head_dim follows hidden / heads), dropouts are ``m.dropout``,
    the special-token ids are our tokenizer's, per-layer lists (``layer_types``) repeat their pattern over the
    new depth, and the position table has 2 spare rows (RoBERTa-style models number positions from
    pad_token_id + 1)."""
    config = load_hf_config(m.model_config)
    if getattr(config, "is_heterogeneous", False):  # transformers' heterogeneous models
        raise ApolloError(f"--model-config {m.model_config}: its layers are configured one by one "
                          "(per_layer_config); apollo copies layers into each other's places, so they must be alike")
    old_heads, kv = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    per_layer = {k: getattr(config, k) for k in per_layer_fields(config, getattr(config, find_depth_field(config)))}
    values = dataclasses.asdict(m) | {"seq_len": m.seq_len + 2}
    for key, names in SIZE_FIELDS.items():
        name = next((n for n in names if _has(config, n)), None)
        if name is not None:
            setattr(config, name, values[key])
    if isinstance(kv, int) and isinstance(old_heads, int) and old_heads % kv == 0 and m.heads % (old_heads // kv) == 0:
        config.num_key_value_heads = m.heads // (old_heads // kv)
    elif isinstance(kv, int):
        config.num_key_value_heads = m.heads
    for name in ("head_dim", "d_head"):  # an explicit head size follows hidden / heads
        if isinstance(vars(config).get(name), int):
            setattr(config, name, m.hidden // m.heads)
    for name, values in per_layer.items():  # one entry per layer, the config's pattern repeated
        setattr(config, name, [values[i % len(values)] for i in range(m.layers)])
    for name, value in list(vars(config).items()):
        if type(value) is float and ("dropout" in name or "pdrop" in name):
            setattr(config, name, m.dropout)
    masked = is_masked(config.model_type)
    ids = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3, "cls_token_id": 2, "sep_token_id": 3,
           "mask_token_id": 4} if masked else {"pad_token_id": None, "bos_token_id": 0, "eos_token_id": 0}
    for name, value in ids.items():  # data.BERT_SPECIALS / the byte-level BPE's <|endoftext|>
        if _has(config, name):
            setattr(config, name, value)
    if _has(config, "use_cache"):
        config.use_cache = False
    try:
        config.validate()  # transformers' own consistency check (e.g. a depth tied to other fields)
    except (ValueError, TypeError) as e:
        lines = [x.strip() for x in str(e).splitlines() if x.strip()]
        raise ApolloError(f"--model-config {m.model_config} at {m.layers} layers, hidden {m.hidden}, {m.heads} heads: "
                          f"{lines[-1] if lines else type(e).__name__}") from None
    return config


def is_masked(model_type: str) -> bool:
    """Masked LM (BERT-style data and loss) or causal LM: the registered entry, else whether transformers has a
    masked-LM class for the model type (encoders do; decoders have only a causal LM)."""
    if model_type in ADAPTERS:
        return ADAPTERS[model_type].mlm
    return model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def hf_config(m: ModelConfig):
    """The HF config for a preset (or ``--model-config``'s, sized); eager-equivalent SDPA attention, no KV cache
    while training."""
    if m.model_config:
        return sized_hf_config(m)
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
    config = hf_config(m)
    cls = {"bert": BertForMaskedLM, "roberta": RobertaForMaskedLM, "gpt2": GPT2LMHeadModel,
           "llama": LlamaForCausalLM}.get(m.arch)
    model = lm_class(config).from_config(config) if m.model_config or cls is None else cls(config)
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


def depth_state(config, n_layers: int | None = None) -> dict[str, object]:
    """The config fields that describe the layer count (the depth field and per-layer lists), to restore later."""
    field = find_depth_field(config, n_layers)
    n = getattr(config, field)
    return {k: getattr(config, k) for k in (field, *per_layer_fields(config, n))}


def set_depth(config, n_layers: int, source: list[int] | None = None, current: int | None = None) -> None:
    """Set the config's layer count; per-layer lists (``layer_types``) keep one entry per layer.

    New layer ``j`` takes the entry of old layer ``source[j]``; without a source the entries must all be
    equal (the list is then resized), since there is no telling which layer an entry belongs to. ``current``:
    the layer count now (finds the depth field of a config without ``num_hidden_layers``).
    """
    field = find_depth_field(config, current)
    for name in per_layer_fields(config, getattr(config, field)):
        values = getattr(config, name)
        if source is not None:
            setattr(config, name, [values[i] for i in source])
        elif len(set(values)) <= 1:
            setattr(config, name, list(values[:1]) * n_layers)
        else:
            raise ApolloError(f"config.{name} differs between layers ({sorted(set(values))}); pass the source "
                              "layer of every new layer to set_layers")
    setattr(config, field, n_layers)


def set_layers(model: nn.Module, layers: nn.ModuleList, depth_field: bool = True,
               source: list[int] | None = None) -> None:
    """Install ``layers`` as the model's layer list; with ``depth_field`` also update the config's depth.

    ``source[j]``: which old layer new layer ``j`` comes from (for per-layer config lists, see ``set_depth``).
    """
    path = layer_path(model)
    current = len(model.get_submodule(path))
    *parents, name = path.split(".")
    setattr(model.get_submodule(".".join(parents)), name, layers)
    if depth_field:
        set_depth(model.config, len(layers), source, current)


def residual_outputs(model: nn.Module, layer: nn.Module) -> list[nn.Module]:
    """The modules that write a layer's residual branches back into the stream (``Adapter.residual_outputs``)."""
    names = model_adapter(model).residual_outputs
    if not names:
        raise ApolloError(f"no residual-output projections found in {type(model).__name__}'s layers; "
                          "give them in an apollo.models.ADAPTERS entry")
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
    registered = ADAPTERS.get(config.model_type)
    return n - config.pad_token_id - 1 if registered and registered.positions_after_pad else n


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
    head = model_adapter(model).head if mlm else ""
    if not head:  # a causal LM, or a masked LM whose head is not one module: HF's own forward and loss
        return model(**batch).loss
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = model.base_model(**inputs).last_hidden_state
    keep = labels != -100
    logits = model.get_submodule(head)(hidden[keep])
    return F.cross_entropy(logits, labels[keep], reduction="sum") / keep.sum().clamp(min=1)


class LMLoss(nn.Module):
    """``lm_loss`` as a module's forward: DistributedDataParallel must see each forward pass, and LiGO's
    ``functional_call`` swaps weights in by parameter name (``model.*``)."""

    def __init__(self, model: nn.Module, mlm: bool):
        super().__init__()
        self.model, self.mlm = model, mlm

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return lm_loss(self.model, batch, self.mlm)
