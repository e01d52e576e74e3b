"""Checkpoints: everything that decides the future of a run, written atomically, loaded without running code.

``RUN/checkpoints/step-00000120/`` (120 optimizer steps done) holds

- ``model.safetensors``: the live layers and the rest of the model (safetensors: plain tensors, no pickle);
- ``optimizer.pt``: the AdamW state (moments of every live layer, also after growth);
- ``state.pt``: step, stage and live layers, FLOP/token/time counters, the depth sampler's generator, the torch and
  Python RNG states, the byte offset of ``metrics.jsonl`` at that step and a fingerprint of the training blocks;
- ``config.yaml``: the resolved config; ``tokenizer/``: the run's tokenizer.

The ``.pt`` files hold only tensors and plain containers and are read with ``torch.load(weights_only=True)``, which
refuses any pickle that would construct other objects or call functions. The learning rate needs no state: it is a
function of the step (``train.lr_at``); the data order neither: a batch is a function of (seed, index).

A checkpoint is written into ``.step-N.tmp`` and renamed into place (``os.replace``, atomic on POSIX), so a crash or
a full disk mid-write leaves the previous checkpoint as the latest complete one.
"""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import random
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from ..config import ApolloError, RunConfig, load_yaml, save_yaml

FORMAT = 1
FILES = ("model.safetensors", "optimizer.pt", "state.pt", "config.yaml", "tokenizer")
STATE_KEYS = ("format", "step", "stage", "live_layers", "counters", "sampler", "torch_rng", "python_rng",
              "log_offset", "data_fingerprint")


@dataclass
class Checkpoint:
    path: Path
    config: RunConfig
    state: dict
    optimizer: dict

    @property
    def step(self) -> int:
        return self.state["step"]


def checkpoint_dir(run: Path) -> Path:
    return Path(run) / "checkpoints"


def _step_of(path: Path) -> int | None:
    name = path.name
    if not name.startswith("step-") or not name[5:].isdigit():
        return None
    return int(name[5:])


def saved(run: Path) -> list[Path]:
    """The run's complete checkpoints, oldest first (temporary ``.tmp`` directories are not checkpoints)."""
    root = checkpoint_dir(run)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _step_of(p) is not None]
    return sorted(found, key=_step_of)


def fingerprint(blocks: torch.Tensor) -> str:
    """A digest of the packed training blocks: resuming on other data would not continue the same run."""
    return hashlib.sha256(blocks.contiguous().numpy().tobytes()).hexdigest()[:32]


def rng_state() -> dict:
    state = {"torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}
    if torch.cuda.is_available():  # dropout on a GPU draws from the device's generator
        state["cuda_rng"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng"])


def _fsync_tree(path: Path) -> None:
    for p in [*sorted(path.rglob("*")), path]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save(run: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, cfg: RunConfig,
         tokenizer, keep: int) -> tuple[Path, int, float]:
    """Write checkpoint ``step`` atomically and keep the newest ``keep`` (0 = all); returns (path, bytes, seconds).

    An OSError (a full disk, a read-only folder) removes the partial copy and becomes an ApolloError; the earlier
    checkpoints are untouched.
    """
    start = time.perf_counter()
    root = checkpoint_dir(run)
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_model(model, str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save({"format": FORMAT, "step": step, **state}, tmp / "state.pt")
        save_yaml(cfg, tmp / "config.yaml")
        tokenizer.save_pretrained(tmp / "tokenizer")
        _fsync_tree(tmp)
        if final.exists():  # only when a resumed run re-saves a step it had already reached
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_tree(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        last = saved(run)
        kept = f"the last good checkpoint {last[-1]} is intact" if last else "no earlier checkpoint exists"
        why = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise ApolloError(f"cannot save checkpoint at step {step} to {root}: {why}; {kept}") from None
    if keep > 0:
        for old in saved(run)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    size = sum(p.stat().st_size for p in final.rglob("*") if p.is_file())
    return final, size, time.perf_counter() - start


def remove_partial(run: Path) -> None:
    """Delete temporary directories left by a save that was killed."""
    root = checkpoint_dir(run)
    if root.is_dir():
        for p in root.glob(".step-*.tmp"):
            shutil.rmtree(p, ignore_errors=True)


def _torch_load(path: Path):
    try:
        with warnings.catch_warnings():  # a foreign pickle protocol warns before it is refused
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [x.strip() for x in str(e).splitlines() if "WeightsUnpickler error" in x] or ["not weights-only"]
        reason = lines[0].replace("WeightsUnpickler error:", "").strip()[:160]
        raise ApolloError(f"refusing to load {path}: it holds more than tensors ({reason})") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise ApolloError(f"checkpoint file {path} is truncated or corrupt ({e.__class__.__name__})") from None


def latest(run: Path) -> Path:
    """The newest complete checkpoint of ``run``; an ApolloError when there is none."""
    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise ApolloError(f"--resume {run}: not an apollo run directory (no config.yaml)")
    found = saved(run)
    if not found:
        raise ApolloError(f"--resume {run}: no checkpoint in {checkpoint_dir(run)} "
                          "(train with --checkpoint-every K to write them)")
    return found[-1]


def load(run: Path) -> Checkpoint:
    """Read and validate the latest checkpoint of ``run`` (weights are applied later by ``load_weights``)."""
    path = latest(run)
    missing = [name for name in FILES if not (path / name).exists()]
    if missing:
        raise ApolloError(f"checkpoint {path} is incomplete or not an apollo checkpoint (missing {', '.join(missing)})")
    state = _torch_load(path / "state.pt")
    if not isinstance(state, dict) or any(k not in state for k in STATE_KEYS) or state["format"] != FORMAT:
        raise ApolloError(f"checkpoint {path} is not an apollo checkpoint of format {FORMAT} (state.pt)")
    optimizer = _torch_load(path / "optimizer.pt")
    if not isinstance(optimizer, dict) or set(optimizer) != {"state", "param_groups"}:
        raise ApolloError(f"checkpoint {path} has no optimizer state (optimizer.pt)")
    return Checkpoint(path, load_yaml(path / "config.yaml"), state, optimizer)


def load_weights(model: nn.Module, ckpt: Checkpoint) -> None:
    """Load the checkpoint's tensors into a model of the checkpoint's shape; any mismatch is an ApolloError."""
    file = ckpt.path / "model.safetensors"
    try:
        missing, unexpected = load_model(model, str(file), strict=False)
    except (SafetensorError, OSError, ValueError) as e:
        raise ApolloError(f"checkpoint file {file} is truncated or corrupt ({e.__class__.__name__})") from None
    except RuntimeError as e:  # shape mismatches
        raise ApolloError(f"checkpoint {ckpt.path} does not fit this model: "
                          f"{(str(e).strip().splitlines() or [''])[-1].strip()[:160]}") from None
    if missing or unexpected:
        names = sorted(missing)[:2] + sorted(unexpected)[:2]
        raise ApolloError(f"checkpoint {ckpt.path} does not fit this model (tensors differ: {', '.join(names)} ...)")
