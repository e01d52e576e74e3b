"""Analytic training FLOPs per step, from the depth actually executed.

Spec: "Training FLOPs are counted per step from the depth actually executed (forward + backward
≈ 3 × forward; include the attention score terms and the LM head over every position the
implementation computes)."

Convention (the same as ``torch.utils.flop_counter.FlopCounterMode``): 2 FLOPs per multiply-accumulate,
matrix multiplications only (layer norms, RMSNorm, softmax, activations, rotary embeddings, biases and the
loss are not counted). With ``h`` the hidden size, ``f`` the FFN width, ``V`` the vocabulary, ``s`` the
sequence length, ``a = heads * head_dim`` the attention width (``= h`` for every preset) and
``kv = kv_heads * head_dim`` the key/value width (``= a`` without grouped-query attention), the forward
FLOPs per token are:

* embeddings: 0 (table lookups);
* per transformer layer: Q and O projections ``2 * 2*h*a``, K and V projections ``2 * 2*h*kv`` (BERT,
  RoBERTa, GPT-2: ``4 * 2*h*h``); attention scores ``Q K^T`` and the attention-weighted values
  ``2 * 2*s*a`` over the full ``s x s`` matrices (no causal discount: the implementation computes the full
  matrices and masks them afterwards); FFN ``2 * 2*h*f``, or ``3 * 2*h*f`` for a gated (SwiGLU) MLP with
  gate, up and down projections (LLaMA, Mistral, Qwen2). The number of heads does not change these counts;
* LM head at every position it is computed on: ``2*V*h``, plus the ``2*h*h`` head transform dense of BERT
  (``BertForMaskedLM``) and RoBERTa (``RobertaForMaskedLM``). HF computes it at every position; apollo's
  training loop (``models.lm_loss``) runs a masked LM's head only at the masked positions, so callers pass
  ``head_tokens`` = the number of labelled positions there.

Which of these a model type has comes from its ``models.ADAPTERS`` entry (``gated_mlp``, ``head_dense``,
``ffn_field``); an unregistered model type is an ``ApolloError``.

A training step is forward + backward, backward = 2 x forward (gradients w.r.t. inputs and weights),
so a step costs 3 x forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .models import adapter


@dataclass(frozen=True)
class _Dims:
    hidden: int
    attn: int  # heads * head_dim
    kv: int  # kv_heads * head_dim
    ffn: int
    vocab: int
    mlp_matrices: int  # 2, or 3 for a gated MLP
    head_dense: bool


def _dims(config: Any) -> _Dims:
    a = adapter(getattr(config, "model_type", None))
    h, heads = int(config.hidden_size), int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or h // heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    ffn = int(getattr(config, a.ffn_field, None) or 4 * h)
    return _Dims(h, heads * head_dim, kv_heads * head_dim, ffn, int(config.vocab_size), 3 if a.gated_mlp else 2,
                 a.head_dense)


def layer_flops(config: Any, tokens: int, seq_len: int) -> int:
    """Forward FLOPs of one transformer layer for ``tokens`` tokens in sequences of ``seq_len``."""
    d = _dims(config)
    per_token = (2 * 2 * d.hidden * d.attn + 2 * 2 * d.hidden * d.kv + 2 * 2 * seq_len * d.attn
                 + d.mlp_matrices * 2 * d.hidden * d.ffn)
    return tokens * per_token


def fixed_flops(config: Any, tokens: int) -> int:
    """Forward FLOPs of everything outside the layers: embeddings (0) and the LM head over ``tokens`` positions."""
    d = _dims(config)
    head = 2 * d.vocab * d.hidden + (2 * d.hidden * d.hidden if d.head_dense else 0)
    return tokens * head


def forward_flops(config: Any, depth: int, tokens: int, seq_len: int, head_tokens: int | None = None) -> int:
    """Forward FLOPs of a model executing ``depth`` layers; the head runs at ``head_tokens`` (default: all)."""
    if depth < 0:
        raise ValueError(f"depth must be >= 0, got {depth}")
    head = tokens if head_tokens is None else head_tokens
    return depth * layer_flops(config, tokens, seq_len) + fixed_flops(config, head)


def train_flops(config: Any, depth: int, tokens: int, seq_len: int, head_tokens: int | None = None) -> int:
    """FLOPs of one training step (forward + backward = 3 x forward) executing ``depth`` layers."""
    return 3 * forward_flops(config, depth, tokens, seq_len, head_tokens)
