"""bert2BERT (Chen et al., ACL 2022): grow a trained smaller model into the target width and depth.

Width (bert2BERT Sec. 3.1, Eq. 4-7, "function-preserving initialisation", FPI): every target unit copies a
source unit, ``g(i)``; a weight's output axis is indexed by ``g`` (``W'[i] = W[g(i)]``) and its input axis is
indexed by ``g`` and divided by the copy count ``c(g(i))``, so a layer reading duplicated units computes what it
did before. The units of each space (``models.WIDTH_AXES``) are chosen as follows:

* FFN units and attention heads: the original units keep their place; each new one copies a randomly drawn
  existing one (heads are copied whole, so the head size must match);
* grouped-query attention (LLaMA, Mistral, Qwen2, Qwen3 with ``num_key_value_heads`` < ``num_attention_heads``):
  query head ``i`` reads key/value head ``i // G`` (``G`` = heads / kv heads, kept fixed). The random draw is
  over key/value heads, and each new kv head brings its whole group of ``G`` query heads with it: target kv head
  ``j`` copies source kv head ``k(j)`` and target query head ``j G + r`` copies source query head ``k(j) G + r``,
  so every copied query head reads a copy of the kv head its source read. Keys and values are not summed over
  heads, so only the output projection divides (by the query-head copy counts). Without GQA (``G`` = 1) this is
  the plain head draw above. Rotary embeddings and Qwen3's per-head ``q_norm`` / ``k_norm`` act within a head
  (head size fixed) and are copied unchanged;
* hidden units of the residual stream: target unit ``i`` copies ``i mod h_small``. When the target width is a
  multiple of the small one every unit then has the same count, so LayerNorm's mean and variance (RMSNorm's
  mean square) are unchanged and the grown model is exactly function-preserving. Other ratios leave the norms'
  statistics slightly changed, as in the paper.

The norm that feeds the output embedding (GPT-2's ``ln_f``, BERT's head transform, the LLaMA family's final
RMSNorm) is divided by the copy counts too: a tied embedding must copy its columns for the input side, so the
division moves there (the LLaMA layout does this whether or not the head is tied; the function is the same).

AKI ("advanced knowledge initialisation", Sec. 3.2, Eq. 8): as FPI, but the new units of layer ``l`` take their
weights from layer ``l + 1`` of the small model (the top layer keeps FPI). It breaks the symmetry between copies
and is not function-preserving.

Depth (Sec. 3.3): stacking (StackBERT) of the widened model when the target is deeper (``growth.expand_layers``).
Stacked copies are the paper's (``new_layers="copy"``, not function-preserving) or identity layers
(``"zeroed"``): zeroed residual outputs, which is enough for pre-LN GPT-2; for post-LN BERT the copies' LayerNorms
are also handed the affine of the layer below (``hand_off_layernorms``), so the grown model is exactly
function-preserving in depth too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from transformers import AutoConfig, PreTrainedModel

from ..config import ApolloError, ModelConfig
from ..method.growth import expand_layers, zeroed_params
from ..models import (
    ADAPTERS,
    SIZE_FIELDS,
    WIDTH_AXES,
    build_model,
    get_layers,
    hf_config,
    layer_path,
    lm_class,
    model_adapter,
    width_axes,
    width_key,
)

WIDTH_INITS = ("aki", "fpi")


@dataclass(frozen=True)
class WidthMap:
    """Per grown space (``h`` hidden, ``a`` query / attention heads, ``kv`` key/value heads, ``qkv`` GPT-2's
    fused q|k|v, ``f`` FFN): the source unit of every target unit, the copy count of every source unit, and which
    target units are new (not the original unit in its own place)."""

    index: dict[str, torch.Tensor]
    counts: dict[str, torch.Tensor]
    new: dict[str, torch.Tensor]


class Dims(NamedTuple):
    """The widths of a config that width growth changes (head size fixed)."""

    hidden: int
    heads: int
    ffn: int
    head_dim: int
    kv_heads: int  # = heads without grouped-query attention

    def describe(self) -> str:
        kv = f" ({self.kv_heads} key/value)" if self.kv_heads != self.heads else ""
        return f"hidden {self.hidden}, {self.heads} heads{kv} of size {self.head_dim}, ffn {self.ffn}"


def dims(config) -> Dims:
    """The widths of a BERT, GPT-2 or LLaMA-family config (``num_key_value_heads``, ``head_dim`` when set)."""
    h, n = config.hidden_size, config.num_attention_heads
    registered = ADAPTERS.get(config.model_type)
    fields = (registered.ffn_field,) if registered else SIZE_FIELDS["ffn"]
    ffn = next((v for f in fields if (v := getattr(config, f, None))), None) or 4 * h
    kv = getattr(config, "num_key_value_heads", None) or n
    return Dims(h, n, ffn, getattr(config, "head_dim", None) or h // n, kv)


def check_width_arch(arch: str) -> None:
    """Width growth (bert2BERT, LiGO) needs a parameter layout in ``models.WIDTH_AXES``."""
    if arch not in WIDTH_AXES:
        *rest, last = WIDTH_AXES
        raise ApolloError(f"bert2bert and ligo grow width, which apollo supports for {', '.join(rest)} and {last} "
                          f"only, not {arch}")


def target_type(target: ModelConfig) -> str:
    """The model type a target config builds (``--model-config``'s own, else ``--arch``)."""
    return hf_config(target).model_type if target.model_config else target.arch


def check_heads(s: Dims, t: Dims) -> None:
    """Heads are copied whole and in whole key/value groups: the head size and the group size must match."""
    if s.head_dim != t.head_dim:
        raise ApolloError(f"head size differs: small {s.hidden}/{s.heads} heads (size {s.head_dim}), target "
                          f"{t.hidden}/{t.heads} (size {t.head_dim}); heads are copied whole")
    if s.heads % s.kv_heads or t.heads % t.kv_heads or s.heads // s.kv_heads != t.heads // t.kv_heads:
        raise ApolloError(f"key/value group size differs: small {s.heads} heads / {s.kv_heads} key/value heads, "
                          f"target {t.heads} / {t.kv_heads}; query heads are copied with their key/value head")


def width_map(small_config, target_config, seed: int) -> WidthMap:
    """The FPI unit choice (module docstring) from a small config to a target config, seeded."""
    s, t = dims(small_config), dims(target_config)
    check_heads(s, t)
    d, group = s.head_dim, s.heads // s.kv_heads
    gen = torch.Generator().manual_seed(seed)
    kv = torch.cat([torch.arange(s.kv_heads), torch.randint(0, s.kv_heads, (t.kv_heads - s.kv_heads,), generator=gen)])
    heads = (kv[:, None] * group + torch.arange(group)).flatten()  # each kv head's query heads come along with it

    def units(h: torch.Tensor) -> torch.Tensor:
        return (h[:, None] * d + torch.arange(d)).flatten()

    index = {
        "h": torch.arange(t.hidden) % s.hidden,
        "a": units(heads),
        "kv": units(kv),
        "f": torch.cat([torch.arange(s.ffn), torch.randint(0, s.ffn, (t.ffn - s.ffn,), generator=gen)]),
    }
    index["qkv"] = torch.cat([index["a"] + k * s.heads * d for k in range(3)])  # GPT-2's fused q|k|v
    counts = {n: torch.bincount(g, minlength=int(g.max()) + 1).to(torch.float32) for n, g in index.items()}
    sizes = {"h": s.hidden, "a": s.heads * d, "kv": s.kv_heads * d, "f": s.ffn}
    new = {n: torch.arange(len(index[n])) >= size for n, size in sizes.items()}
    new["qkv"] = new["a"].repeat(3)
    return WidthMap(index, counts, new)


def expand(w: torch.Tensor, axes: tuple[str, ...], wmap: WidthMap) -> torch.Tensor:
    """FPI of one parameter: index every grown axis by the unit map; divide "/" axes by the copy counts."""
    for dim, code in enumerate(axes):
        space = code.rstrip("/")
        if not space:
            continue
        g = wmap.index[space]
        w = w.index_select(dim, g)
        if code.endswith("/"):
            shape = [1] * w.ndim
            shape[dim] = -1
            w = w / wmap.counts[space][g].view(shape)
    return w


def new_units(shape: torch.Size, axes: tuple[str, ...], wmap: WidthMap) -> torch.Tensor:
    """Boolean mask over a grown parameter: True where an output axis (no "/") indexes a new unit."""
    mask = torch.zeros(shape, dtype=torch.bool)
    for dim, code in enumerate(axes):
        if code and not code.endswith("/"):
            view = [1] * len(shape)
            view[dim] = -1
            mask = mask | wmap.new[code].view(view)
    return mask


def widen(small: nn.Module, target: nn.Module, wmap: WidthMap, init: str) -> dict[str, torch.Tensor]:
    """The target's parameters (name -> tensor) grown from ``small`` (same depth) by FPI or AKI."""
    if init not in WIDTH_INITS:
        raise ApolloError(f"unknown width init {init!r} (choose from {', '.join(WIDTH_INITS)})")
    axes = width_axes(small)
    source = {n: p.detach() for n, p in small.named_parameters()}
    fpi = {n: expand(source[n], axes[width_key(target, n)], wmap) for n, _ in target.named_parameters()}
    if init == "fpi":
        return fpi
    prefix, depth = layer_path(target) + ".", len(get_layers(small))
    aki = dict(fpi)
    for name, w in fpi.items():
        if not name.startswith(prefix):
            continue
        index, rest = name[len(prefix):].split(".", 1)
        if int(index) + 1 < depth:  # the top layer has no layer above it and keeps FPI
            mask = new_units(w.shape, axes[width_key(target, name)], wmap)
            aki[name] = torch.where(mask, fpi[f"{prefix}{int(index) + 1}.{rest}"], w)
    return aki


def small_dir(run_dir: str | Path) -> str:
    """The model directory of a run (``RUN/model``), or ``run_dir`` itself when it is a model directory."""
    path = Path(run_dir)
    return str(path / "model" if (path / "model").is_dir() else path)


def load_small(run_dir: str | Path, target: ModelConfig) -> PreTrainedModel:
    """The trained model of a run directory (``RUN/model`` or a model directory), checked against the target."""
    check_width_arch(target_type(target))
    path = Path(small_dir(run_dir))
    if not (path / "config.json").is_file():
        raise ApolloError(f"--small-model {run_dir}: no trained model there (expected {path}/config.json)")
    try:
        config = AutoConfig.from_pretrained(path)
        if config.model_type not in WIDTH_AXES:
            raise ApolloError(f"--small-model {run_dir}: model type {config.model_type!r} (need one of "
                              f"{', '.join(WIDTH_AXES)})")
        small = lm_class(config).from_pretrained(path)  # AutoModelForMaskedLM / AutoModelForCausalLM
    except (OSError, ValueError) as e:
        if isinstance(e, ApolloError):
            raise
        raise ApolloError(f"cannot load --small-model {run_dir}: {str(e).splitlines()[0]}") from None
    check_small(small.config, target)
    return small.eval()


def check_small(small, target: ModelConfig) -> None:
    """The small model (its config) must be growable into the target: same kind, vocabulary, positions, head size
    and key/value group size, and no dimension larger."""
    config = hf_config(target)  # what the target builds (a --model-config target: its own type and position table)
    s, t, depth = dims(small), dims(config), small.num_hidden_layers
    if small.model_type != config.model_type:
        raise ApolloError(f"small model is {small.model_type}, the target is {config.model_type}")
    if small.vocab_size != config.vocab_size or small.max_position_embeddings != config.max_position_embeddings:
        raise ApolloError(f"small model has vocab {small.vocab_size} / {small.max_position_embeddings} positions, "
                          f"the target {config.vocab_size} / {config.max_position_embeddings}; they must match")
    if getattr(small, "tie_word_embeddings", True) != getattr(config, "tie_word_embeddings", True):
        tied = {True: "tied", False: "untied"}
        raise ApolloError(f"small model's output embedding is {tied[bool(small.tie_word_embeddings)]}, the "
                          f"target's {tied[bool(config.tie_word_embeddings)]}; they must match")
    check_heads(s, t)
    if s.hidden > t.hidden or s.heads > t.heads or s.ffn > t.ffn or depth > target.layers:
        raise ApolloError(f"small model ({s.describe()}, {depth} layers) is larger than the target "
                          f"({t.describe()}, {target.layers} layers)")


def hand_off_layernorms(model: nn.Module, source: list[int]) -> None:
    """Make post-LN repeat copies (zeroed residual outputs) exact identities.

    A post-LN layer whose branches add nothing still applies ``LN(x)`` to a stream ``x = g * n + b`` that an earlier
    LayerNorm produced (``n`` normalised), and ``LN(g * n + b)`` is not ``x``. So the layer below a run of copies
    outputs plain ``n`` (its last LayerNorm gets weight 1, bias 0), every copy's LayerNorms are the identity on an
    already normalised ``n`` (``LN(n) = n`` up to eps), and the last copy's output LayerNorm applies the ``g, b``
    taken from the layer below.
    """
    names = model_adapter(model).post_ln
    layers = get_layers(model)
    zeroed = {id(p) for p in zeroed_params(model, layers, source)}
    copies = [any(id(p) in zeroed for p in layer.parameters()) for layer in layers]
    with torch.no_grad():
        for j in range(1, len(layers)):
            if not names or not copies[j] or copies[j - 1]:
                continue
            end = j
            while end + 1 < len(layers) and copies[end + 1]:
                end += 1
            below = layers[j - 1].get_submodule(names[1])
            affine = below.weight.clone(), below.bias.clone()
            for ln in [below] + [layers[k].get_submodule(n) for k in range(j, end + 1) for n in names]:
                ln.weight.fill_(1.0)
                ln.bias.zero_()
            top = layers[end].get_submodule(names[1])
            top.weight.copy_(affine[0])
            top.bias.copy_(affine[1])


def bert2bert(small: PreTrainedModel, target: ModelConfig, init: str, new_layers: str, seed: int) -> PreTrainedModel:
    """bert2BERT: widen ``small`` to the target width by FPI or AKI, then stack it to the target depth."""
    model = build_model(target, small.config.num_hidden_layers, seed)  # target width, small depth; overwritten
    grown = widen(small, model, width_map(small.config, model.config, seed), init)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(grown[name])
    if target.layers > len(get_layers(model)):
        source = expand_layers(model, target.layers, "stacking", new_layers)
        if new_layers == "zeroed":
            hand_off_layernorms(model, source)
    return model


def small_shape(target: ModelConfig, hidden: int = 0, layers: int = 0) -> ModelConfig:
    """The default small model for a target: half the width (same head size and key/value group size, FFN scaled
    alike), same depth."""
    check_width_arch(target_type(target))
    hidden = hidden or target.hidden // 2
    head = target.hidden // target.heads
    if hidden % head or hidden > target.hidden:
        raise ApolloError(f"--small-hidden {hidden} must be a multiple of the head size {head} and <= {target.hidden}")
    if target.model_config:  # grouped-query attention: the small model's heads must fill whole key/value groups
        t = dims(hf_config(target))
        group = t.heads // t.kv_heads
        if (hidden // head) % group:
            raise ApolloError(f"--small-hidden {hidden} gives {hidden // head} heads, not a multiple of the "
                              f"target's {group} query heads per key/value head")
    return dataclasses.replace(target, hidden=hidden, heads=hidden // head, ffn=target.ffn * hidden // target.hidden,
                               layers=layers or target.layers)
