"""Experiment trackers beside metrics.jsonl (``--report-to tensorboard,wandb,trackio``).

metrics.jsonl stays the source of truth: each tracker gets the same numbers through its own library, with the
record's global optimizer step as x-axis, so a resumed run continues its curves. Only rank 0 reports.

* TensorBoard: ``torch.utils.tensorboard.SummaryWriter`` into RUN/tensorboard/. A resumed run opens a new event
  file with ``purge_step`` at the checkpoint's step (TensorBoard drops the killed run's later points) and replays
  what metrics.jsonl kept from that step on, so every curve is the run's log.
* Weights & Biases: offline (``WANDB_MODE=offline`` unless you set it) into RUN/wandb/; a resumed run continues the
  same run id (RUN/wandb/apollo-run-id). ``wandb sync RUN/wandb/offline-run-*`` uploads it.
* Trackio: its local store (``trackio show``), project ``apollo``, the run named by its directory.
"""

from __future__ import annotations

import importlib
import json
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

from ..config import ApolloError, RunConfig, TrainConfig, to_dict

# name -> (module to import, pip package)
TRACKERS = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "trackio": ("trackio", "trackio")}


def names(report_to: Sequence[str]) -> list[str]:
    """The trackers asked for: values may be comma-separated; ``none`` asks for none."""
    out = []
    for value in report_to:
        for name in str(value).split(","):
            name = name.strip().lower()
            if name in ("", "none"):
                continue
            if name not in TRACKERS:
                raise ApolloError(f"unknown --report-to {name!r} (choose from {', '.join(TRACKERS)}, none)")
            if name not in out:
                out.append(name)
    return out


def require(name: str):
    """The tracker's library, or a one-line error naming the pip command."""
    module, package = TRACKERS[name]
    try:
        return importlib.import_module(module)
    except Exception:  # ImportError, or a broken install (e.g. a protobuf mismatch)
        raise ApolloError(f"--report-to {name} needs the {package} package: pip install {package}") from None


def check(t: TrainConfig) -> None:
    """Every requested tracker is known and importable (called by ``config.check``, before anything is written)."""
    for name in names(t.report_to):
        require(name)


def scalars(record: dict, previous_step: dict | None = None) -> dict[str, float]:
    """The tracked values of one metrics.jsonl record (empty for records with none).

    ``train/tokens_per_s`` is the step's own throughput: tokens and training seconds since ``previous_step`` (the
    previous step record), or the run's average so far when there is none (the first step, or after a resume)."""
    event = record.get("event")
    if event == "step":
        depths = record["depth"]
        tokens, wall = record["tokens"], record["wall_s"]
        if previous_step is not None and wall > previous_step["wall_s"]:
            tokens, wall = tokens - previous_step["tokens"], wall - previous_step["wall_s"]
        return {"train/loss": record["loss"], "train/grad_norm": record["grad_norm"], "train/lr": record["lr"],
                "train/depth": sum(depths) / len(depths), "train/live_layers": record["live_layers"],
                "train/flops": record["flops"], "train/tokens": record["tokens"],
                "train/tokens_per_s": tokens / wall if wall > 0 else 0.0}
    if event == "eval":
        out = {"eval/val_loss": record["val_loss"]}
        for key in ("energy_kwh", "emissions_kg"):
            if record.get(key) is not None:
                out[f"eval/{key}"] = record[key]
        return out
    if event == "test":
        return {"test/loss": record["test_loss"]}
    if event == "operator_step":  # LiGO's operator phase, x = operator step
        return {"operator/loss": record["loss"]}
    return {}


class _TensorBoard:
    def __init__(self, out: Path, first: int, resumed: bool, replay: list[dict]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=first if resumed else None, flush_secs=30)
        previous = None
        for record in replay:
            self.log(record["event"], record["step"], scalars(record, previous))
            previous = record if record["event"] == "step" else previous

    def log(self, event: str, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, out: Path, name: str, config: dict, resumed: bool):
        import wandb

        id_file = out / "wandb" / "apollo-run-id"
        run_id = id_file.read_text(encoding="utf-8").strip() if resumed and id_file.exists() else uuid.uuid4().hex[:12]
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id, encoding="utf-8")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "apollo"), name=name, id=run_id, dir=str(out),
                              config=config, resume="allow", mode=os.environ.get("WANDB_MODE") or "offline",
                              settings=wandb.Settings(console="off", quiet=True))
        # the global step as x-axis (wandb's own step must only increase; a resumed run repeats a few steps)
        self.run.define_metric("global_step")
        self.run.define_metric("*", step_metric="global_step")
        self.run.define_metric("operator/*", step_metric="operator/step")

    def log(self, event: str, step: int, values: dict[str, float]) -> None:
        self.run.log({"operator/step" if event == "operator_step" else "global_step": step, **values})

    def close(self) -> None:
        self.run.finish()


class _Trackio:
    def __init__(self, name: str, config: dict, resumed: bool):
        import trackio

        self.run = trackio.init(project="apollo", name=name, config=config, resume="allow" if resumed else "never",
                                embed=False, auto_log_cpu=False, auto_log_gpu=False)

    def log(self, event: str, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """Open the requested trackers for a run; call with each metrics.jsonl record; close (a context manager).

    ``report_to`` empty (or rank > 0): does nothing. ``first`` is the step the run starts at (a resumed run's
    checkpoint step); metrics.jsonl must already be cut back to that checkpoint."""

    def __init__(self, report_to: Sequence[str], out: Path, cfg: RunConfig, first: int = 0, resumed: bool = False):
        self.backends, self.previous = [], None
        chosen = names(report_to)
        if not chosen:
            return
        out = Path(out)
        config = to_dict(cfg)
        replay = []
        if resumed and (out / "metrics.jsonl").exists():
            lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
            replay = [r for r in map(json.loads, lines) if scalars(r) and r.get("step", -1) >= first]
        try:
            for name in chosen:
                require(name)
                if name == "tensorboard":
                    self.backends.append(_TensorBoard(out, first, resumed, replay))
                elif name == "wandb":
                    self.backends.append(_Wandb(out, str(cfg.out), config, resumed))
                else:
                    self.backends.append(_Trackio(str(cfg.out), config, resumed))
        except BaseException:
            self.close()
            raise

    def __call__(self, record: dict) -> None:
        if not self.backends:
            return
        values = scalars(record, self.previous)
        if record.get("event") == "step":
            self.previous = record
        if values:
            for backend in self.backends:
                backend.log(record["event"], record["step"], values)

    def close(self) -> None:
        backends, self.backends = self.backends, []
        for backend in backends:
            backend.close()

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
