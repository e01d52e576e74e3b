"""Presets -> Hugging Face models, and the layer adapter (where a model keeps its layer list).

The adapter is the only place that knows model internals: Apollo, StackBERT and the FLOP
counter all work through ``get_layers`` / ``set_layers``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, PreTrainedModel

from .config import ApolloError, ModelConfig

# Attribute paths of the layer list, tried in order (BERT/RoBERTa, GPT-2, LLaMA-style, GPT-NeoX, OPT).
LAYER_PATHS = ("bert.encoder.layer", "roberta.encoder.layer", "transformer.h", "model.layers", "gpt_neox.layers",
               "model.decoder.layers")
ARCHS = ("bert", "gpt2")
# Per model type, the last projection of each residual branch (attention out, MLP out) inside one layer.
# Zeroing both turns a pre-LN layer into the identity (used by function-preserving growth).
RESIDUAL_OUTPUTS = {"gpt2": ("attn.c_proj", "mlp.c_proj"), "bert": ("attention.output.dense", "output.dense"),
                    "roberta": ("attention.output.dense", "output.dense"),
                    "llama": ("self_attn.o_proj", "mlp.down_proj")}
# Post-LN model types: the LayerNorms after a layer's attention and FFN residual sums (identity layers need them).
POST_LN = {"bert": ("attention.output.LayerNorm", "output.LayerNorm"),
           "roberta": ("attention.output.LayerNorm", "output.LayerNorm")}
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
    if m.arch == "gpt2":
        return GPT2Config(vocab_size=m.vocab, n_embd=m.hidden, n_layer=m.layers, n_head=m.heads, n_inner=m.ffn,
                          n_positions=m.seq_len, resid_pdrop=m.dropout, embd_pdrop=m.dropout, attn_pdrop=m.dropout,
                          bos_token_id=0, eos_token_id=0, use_cache=False)
    raise ApolloError(f"unknown arch {m.arch!r} (choose from {', '.join(ARCHS)})")


def build_model(m: ModelConfig, live_layers: int, seed: int) -> PreTrainedModel:
    """A freshly initialised model whose layer list holds the first ``live_layers`` of an L-layer init.

    Building the full depth first means every method starts from the same embeddings, head and
    (first) layers for a given seed, and GPT-2's depth-scaled init uses the target depth L.
    """
    torch.manual_seed(seed)
    cls = BertForMaskedLM if m.arch == "bert" else GPT2LMHeadModel
    model = cls(hf_config(m))
    if m.arch == "gpt2":
        model.loss_type = "ForCausalLM"  # HF cannot infer it from the class name and warns; this is its default
    if live_layers < m.layers:
        set_layers(model, nn.ModuleList(list(get_layers(model))[:live_layers]))
    return model


def layer_path(model: nn.Module) -> str:
    """Dotted attribute path of the model's layer list, e.g. ``bert.encoder.layer``."""
    for path in LAYER_PATHS:
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList):
            return path
    raise ApolloError(f"{type(model).__name__}: no layer list found at {', '.join(LAYER_PATHS)}; "
                      "add its attribute path to apollo.models.LAYER_PATHS")


def get_layers(model: nn.Module) -> nn.ModuleList:
    obj = model
    for part in layer_path(model).split("."):
        obj = getattr(obj, part)
    return obj


def set_layers(model: nn.Module, layers: nn.ModuleList, depth_field: bool = True) -> None:
    """Install ``layers`` as the model's layer list; with ``depth_field`` also update config's depth."""
    *parents, name = layer_path(model).split(".")
    owner = model
    for part in parents:
        owner = getattr(owner, part)
    setattr(owner, name, layers)
    if depth_field:
        model.config.num_hidden_layers = len(layers)


def residual_outputs(model: nn.Module, layer: nn.Module) -> list[nn.Module]:
    """The modules that write a layer's residual branches back into the stream (see RESIDUAL_OUTPUTS)."""
    names = RESIDUAL_OUTPUTS.get(model.config.model_type)
    if names is None:
        raise ApolloError(f"no residual-output projections known for model type {model.config.model_type!r}; "
                          "add them to apollo.models.RESIDUAL_OUTPUTS")
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


def renumber_layers(layers: nn.ModuleList) -> None:
    """Give each distinct layer its position as ``layer_idx`` (used by KV caches) after a rebuild."""
    for i, layer in enumerate(layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = i


def lm_loss(model: PreTrainedModel, batch: dict[str, torch.Tensor], mlm: bool) -> torch.Tensor:
    """The LM loss of ``batch``; for MLM the prediction head runs only over the masked positions.

    HF's ``BertForMaskedLM`` applies its head (dense h x h + LayerNorm + h x V decoder) at every
    position and then ignores ~85% of them in the loss. Selecting the labelled positions first gives
    the same loss (the head is per-position) for ~15% of the head's cost, which matters for growth
    schedules: the head is a fixed cost that does not shrink with the executed depth.
    """
    if not mlm:
        return model(**batch).loss
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = model.base_model(**inputs).last_hidden_state
    keep = labels != -100
    logits = model.cls(hidden[keep])
    return F.cross_entropy(logits, labels[keep], reduction="sum") / keep.sum().clamp(min=1)
