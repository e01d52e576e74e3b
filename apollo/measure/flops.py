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
``ffn_field``). Any other architecture is measured instead (``StepFlops``): ``FlopCounterMode`` counts one
training step (forward + backward) of a 1-layer and a 2-layer copy of the model, built on the meta device (no
memory, no arithmetic) with eager attention, on one sequence, once per sequence length (every count is linear
in the batch); the difference is one
layer's cost, the rest the fixed cost, and a separable masked-LM head is counted per predicted token. That count
is exact in FlopCounterMode's own convention, whatever the layer holds.

A training step is forward + backward, backward = 2 x forward (gradients w.r.t. inputs and weights),
so a step costs 3 x forward.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..config import ApolloError
from ..models import ADAPTERS, adapter, find_depth_field, is_masked, lm_class, model_adapter, set_depth


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
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ApolloError(f"the FLOP formula knows {', '.join(ADAPTERS)}, not {model_type!r}; train_flops and "
                          "StepFlops measure any other architecture")
    a = adapter(model_type)
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
    """FLOPs of one training step (forward + backward = 3 x forward) executing ``depth`` layers; measured for
    an unregistered architecture (``StepFlops``, which a training loop keeps to measure once)."""
    return StepFlops(config).train(depth, tokens, seq_len, head_tokens)


def _measured_step(config: Any, depth: int, seq_len: int, head_rows: int) -> int:
    """FlopCounterMode's count of one forward + backward of ``config``'s LM at ``depth`` layers on one sequence of
    ``seq_len`` (every count is linear in the batch); ``head_rows`` > 0: only the backbone, plus the LM head on
    that many rows (apollo's masked-LM loss). On the meta device, or for models whose forward reads a value
    (``.item()``), on a real tiny copy."""
    config = copy.deepcopy(config)
    n = getattr(config, find_depth_field(config))
    set_depth(config, depth, [min(i, n - 1) for i in range(depth)])
    try:
        return _count(config, seq_len, head_rows, torch.device("meta"))
    except (RuntimeError, NotImplementedError):
        return _count(config, seq_len, head_rows, torch.device("cpu"))


def _count(config: Any, seq_len: int, head_rows: int, device: torch.device) -> int:
    with torch.random.fork_rng(devices=[]), device:  # building a model must not move the run's random stream
        model = lm_class(config).from_config(config, attn_implementation="eager")
        ids = torch.full((1, seq_len), 5, dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            if head_rows:
                hidden = model.base_model(input_ids=ids).last_hidden_state
                out = model.get_submodule(model_adapter(model).head)(hidden.reshape(-1, hidden.shape[-1])[:head_rows])
            else:
                out = model(input_ids=ids).logits
            out.float().sum().backward()
    return counter.get_total_flops()


class StepFlops:
    """Training-step FLOPs of one model config: the analytic formula for a registered model type, else measured
    (module docstring) once per sequence length and kept. OPT with an embedding projection
    (``word_embed_proj_dim`` != hidden) has matrices the formula does not hold, so it is measured too."""

    def __init__(self, config: Any):
        projected = getattr(config, "word_embed_proj_dim", None) not in (None, getattr(config, "hidden_size", None))
        self.config = config
        self.known = getattr(config, "model_type", None) in ADAPTERS and not projected
        self.costs: dict[int, tuple[int, int, int]] = {}  # per sequence length, for one sequence
        self.head = ""
        if not self.known and is_masked(config.model_type):
            with torch.random.fork_rng(devices=[]), torch.device("meta"):
                self.head = model_adapter(lm_class(config).from_config(copy.deepcopy(config))).head

    def _costs(self, tokens: int, seq_len: int) -> tuple[int, int, int]:
        """(per layer, fixed, per head row) of a step over ``tokens`` tokens in sequences of ``seq_len``."""
        if seq_len not in self.costs:
            rows = min(8, seq_len // 2) if self.head else 0
            one, two = (_measured_step(self.config, d, seq_len, rows) for d in (1, 2))
            head = 0
            if self.head:  # one head row: the difference between 2 x rows and rows
                head = (_measured_step(self.config, 1, seq_len, 2 * rows) - one) // rows
            self.costs[seq_len] = (two - one, 2 * one - two - rows * head, head)
        layer, fixed, head = self.costs[seq_len]
        sequences = tokens // seq_len
        return sequences * layer, sequences * fixed, head

    def train(self, depth: int, tokens: int, seq_len: int, head_tokens: int | None = None) -> int:
        """FLOPs of one step executing ``depth`` layers; the head runs at ``head_tokens`` (default: all)."""
        if self.known:
            return 3 * forward_flops(self.config, depth, tokens, seq_len, head_tokens)
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        layer, fixed, head = self._costs(tokens, seq_len)
        if not self.head:  # the whole model runs, its head at every position
            return depth * layer + fixed
        return depth * layer + fixed + head * (tokens if head_tokens is None else head_tokens)
