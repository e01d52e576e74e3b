"""Analytic training FLOPs per step, from the depth actually executed.

Spec: "Training FLOPs are counted per step from the depth actually executed (forward + backward
≈ 3 × forward; include the attention score terms and the LM head over every position the
implementation computes)."

Convention (the same as ``torch.utils.flop_counter.FlopCounterMode``): 2 FLOPs per multiply-accumulate,
matrix multiplications only (layer norms, softmax, activations, biases and the loss are not counted).
With ``h`` the hidden size, ``f`` the FFN width, ``V`` the vocabulary and ``s`` the sequence length,
the forward FLOPs per token are:

* embeddings: 0 (table lookups);
* per transformer layer: Q, K, V, O projections ``4 * 2*h*h``; attention scores ``Q K^T`` and the
  attention-weighted values ``2 * 2*s*h`` over the full ``s x s`` matrices (no causal discount: the
  implementation computes the full matrices, GPT-2 masks them afterwards); FFN ``2 * 2*h*f``.
  The number of heads does not change these counts;
* LM head at every position it is computed on: BERT ``BertForMaskedLM`` head transform dense
  ``2*h*h`` plus decoder ``2*V*h``; GPT-2 ``GPT2LMHeadModel`` ``lm_head`` ``2*V*h``. HF computes it at
  every position; apollo's training loop (``models.lm_loss``) runs BERT's head only at the masked
  positions, so callers pass ``head_tokens`` = the number of labelled positions there.

A training step is forward + backward, backward = 2 x forward (gradients w.r.t. inputs and weights),
so a step costs 3 x forward.
"""

from __future__ import annotations

from typing import Any


def _dims(config: Any) -> tuple[str, int, int, int]:
    """(model_type, hidden, ffn, vocab) from a BertConfig or GPT2Config."""
    kind = getattr(config, "model_type", None)
    h = int(config.hidden_size)
    if kind == "bert":
        ffn = int(config.intermediate_size)
    elif kind == "gpt2":
        ffn = int(config.n_inner or 4 * h)
    else:
        raise ValueError(f"FLOP formulas exist only for model_type 'bert' and 'gpt2', got {kind!r}")
    return kind, h, ffn, int(config.vocab_size)


def layer_flops(config: Any, tokens: int, seq_len: int) -> int:
    """Forward FLOPs of one transformer layer for ``tokens`` tokens in sequences of ``seq_len``."""
    _, h, ffn, _ = _dims(config)
    per_token = 4 * 2 * h * h + 2 * 2 * seq_len * h + 2 * 2 * h * ffn
    return tokens * per_token


def fixed_flops(config: Any, tokens: int) -> int:
    """Forward FLOPs of everything outside the layers: embeddings (0) and the LM head over ``tokens`` positions."""
    kind, h, _, vocab = _dims(config)
    head = 2 * vocab * h + (2 * h * h if kind == "bert" else 0)
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
