"""Will the run fit? An estimate of its peak memory, made before anything is allocated.

Parameters come from a 1-layer and a 2-layer copy of the model built on the meta device (no memory; exact for any
architecture, whatever the depth asked for), extrapolated to L layers. Training holds, per parameter, fp32
weights, gradients and AdamW's two moments (16 bytes), and activations for the backward pass; for those we use
the per-layer count of Korthikanti et al. 2022 ("Reducing activation recomputation in large transformer
models", Eq. 2: ``s b h (34 + 5 a s / h)`` bytes at 16 bits, doubled for fp32), plus the logits and their
gradient (``3 x b s V`` floats). It is an estimate within a small factor (tested against real allocations);
it exists to refuse, in one line, runs that cannot fit by far, not to plan a tight one.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from ..config import ApolloError, ModelConfig, TrainConfig


def parameters(m: ModelConfig) -> int:
    """Parameter count of the L-layer model (meta-built 1- and 2-layer copies, extrapolated)."""
    from ..models import build_model

    def count(layers: int) -> int:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            return sum(p.numel() for p in build_model(dataclasses.replace(m, layers=layers), layers, 0).parameters())

    one, two = count(1), count(2)
    return one + (m.layers - 1) * (two - one)


def estimate_bytes(m: ModelConfig, t: TrainConfig) -> tuple[int, int]:
    """(bytes of weights + gradients + AdamW state, bytes of activations) of one training step."""
    n = parameters(m)
    b, s, h = t.batch_size, m.seq_len, m.hidden
    per_layer = s * b * h * (34 + 5 * m.heads * s / h) * (1 if t.precision == "bf16" else 2)
    activations = m.layers * per_layer + 3 * b * s * m.vocab * 4
    return 16 * n, int(activations)


def available_bytes(device: torch.device) -> int:
    """Free memory of the device the run uses: the GPU's, else this machine's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(m: ModelConfig, t: TrainConfig, device: torch.device) -> None:
    """Refuse, naming the numbers, a run whose estimate exceeds the free memory of its device."""
    state, activations = estimate_bytes(m, t)
    free = available_bytes(device)
    if state + activations > free:
        raise ApolloError(f"this run needs about {(state + activations) / 2**30:.1f} GiB ({parameters(m) / 1e6:,.0f}M "
                          f"parameters: {state / 2**30:.1f} GiB of weights, gradients and AdamW state; "
                          f"{activations / 2**30:.1f} GiB of activations at batch {t.batch_size} x {m.seq_len}) but "
                          f"{device.type} has {free / 2**30:.1f} GiB free; lower --layers, --hidden, --vocab or "
                          "--batch-size")
