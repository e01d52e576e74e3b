"""--report-to: a real run's TensorBoard events equal metrics.jsonl (also across a resume); wandb and trackio get
the same numbers (fake libraries: neither is a test dependency); bad or missing trackers are one line, exit 2."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from apollo.cli import build_parser, main, resolve_config
from apollo.config import ApolloError, RunConfig
from apollo.runtime.trackers import Trackers, names, scalars

TINY = ["--layers", "12", "--hidden", "32", "--heads", "2", "--ffn", "64", "--vocab", "512", "--seq-len", "16",
        "--batch-size", "8", "--synthetic-sentences", "1200", "--eval-blocks", "8", "--no-progress", "--threads", "1"]
TRAIN = ["train", "--preset", "gpt-tiny", "--method", "apollo", *TINY, "--steps", "20", "--eval-every", "5"]


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def expected(run: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] computed from metrics.jsonl alone (the first step after a resume: its average)."""
    out: dict[str, list[tuple[int, float]]] = {}
    previous = None
    for r in records(run):
        if r["event"] == "resume":
            previous = None
        if r["event"] == "step":
            tokens, wall = r["tokens"], r["wall_s"]
            if previous is not None:
                tokens, wall = tokens - previous["tokens"], wall - previous["wall_s"]
            previous = r
            values = {"loss": r["loss"], "grad_norm": r["grad_norm"], "lr": r["lr"],
                      "depth": sum(r["depth"]) / len(r["depth"]), "live_layers": r["live_layers"],
                      "flops": r["flops"], "tokens": r["tokens"], "tokens_per_s": tokens / wall}
            for k, v in values.items():
                out.setdefault(f"train/{k}", []).append((r["step"], v))
        elif r["event"] == "eval":
            out.setdefault("eval/val_loss", []).append((r["step"], r["val_loss"]))
    return out


def tensorboard_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))  # applies purge_step: a resumed run's dropped points go
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for tag, points in want.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag  # float32 events


def test_tensorboard_scalars_equal_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    assert main([*TRAIN, "--report-to", "tensorboard", "--out", str(run)]) == 0
    got = tensorboard_scalars(run)
    want = expected(run)
    assert_same(got, want)
    assert [s for s, _ in got["train/loss"]] == list(range(20))
    assert [s for s, _ in got["eval/val_loss"]] == [5, 10, 15, 20]
    assert {v for _, v in got["train/live_layers"]} == {1.0, 3.0, 6.0, 12.0}  # apollo grows 1 -> 3 -> 6 -> 12
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1


def test_resumed_run_continues_the_tensorboard_curves(tmp_path):
    """Resumed from the checkpoint at step 15: its points replace the first run's from step 15 on."""
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    assert main([*TRAIN, "--report-to", "tensorboard", "--checkpoint-every", "5", "--out", str(run)]) == 0
    (run / "summary.json").unlink()  # a finished run is not resumable; make it look interrupted after step 19
    assert main(["train", "--resume", str(run)]) == 0
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2
    got = tensorboard_scalars(run)
    assert_same(got, expected(run))  # every step once, in order, with the log's values
    assert [s for s, _ in got["train/loss"]] == list(range(20))
    assert [s for s, _ in got["eval/val_loss"]] == [5, 10, 15, 20]


def test_names_comma_separated_repeated_and_none():
    assert names(["tensorboard,wandb", "tensorboard", " TrackIO "]) == ["tensorboard", "wandb", "trackio"]
    assert names(["none"]) == [] and names([]) == [] and names(["none,tensorboard"]) == ["tensorboard"]
    with pytest.raises(ApolloError, match="unknown --report-to 'tensorbord'"):
        names(["tensorbord"])
    args = build_parser().parse_args(["train", "--preset", "gpt-tiny", "--report-to", "tensorboard", "--report-to",
                                      "wandb,trackio"])
    assert resolve_config(args).train.report_to == ("tensorboard", "wandb,trackio")


def _fail(argv: list[str], capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("apollo: error:") and "Traceback" not in err, err
    return err


def test_unknown_tracker_is_one_line_and_nothing_is_written(tmp_path, capsys):
    err = _fail([*TRAIN, "--report-to", "tensorboard,mlflow", "--out", str(tmp_path / "run")], capsys)
    assert err == "apollo: error: unknown --report-to 'mlflow' (choose from tensorboard, wandb, trackio, none)"
    assert not (tmp_path / "run").exists()
    err = _fail(["compare", "--preset", "gpt-tiny", *TINY, "--steps", "4", "--report-to", "tb",
                 "--out", str(tmp_path / "cmp")], capsys)
    assert "unknown --report-to 'tb'" in err and not (tmp_path / "cmp").exists()


@pytest.mark.parametrize("name,module", [("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb"),
                                         ("trackio", "trackio")])
def test_missing_library_names_the_pip_command(tmp_path, capsys, monkeypatch, name, module):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if the package were not installed
    err = _fail([*TRAIN, "--report-to", name, "--out", str(tmp_path / "run")], capsys)
    assert err == f"apollo: error: --report-to {name} needs the {name} package: pip install {name}"
    assert not (tmp_path / "run").exists()
    err = _fail(["compare", "--preset", "gpt-tiny", *TINY, "--steps", "4", "--report-to", name,
                 "--out", str(tmp_path / "cmp")], capsys)
    assert f"pip install {name}" in err and not (tmp_path / "cmp").exists()


class _FakeRun:
    def __init__(self, calls: list, **kwargs):
        self.calls = calls
        calls.append(("init", kwargs))

    def define_metric(self, name, step_metric=None):
        self.calls.append(("define_metric", name, step_metric))

    def log(self, values, step=None):
        self.calls.append(("log", dict(values), step))

    def finish(self):
        self.calls.append(("finish",))


def _fake_modules(monkeypatch) -> list:
    calls: list = []
    wandb = types.ModuleType("wandb")
    wandb.init = lambda **kw: _FakeRun(calls, lib="wandb", **kw)
    wandb.Settings = lambda **kw: kw
    trackio = types.ModuleType("trackio")
    trackio.init = lambda **kw: _FakeRun(calls, lib="trackio", **kw)
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "trackio", trackio)
    return calls


STEP = {"event": "step", "step": 3, "stage": 1, "live_layers": 3, "depth": [3, 5], "loss": 4.5, "grad_norm": 0.7,
        "lr": 1e-3, "tokens": 400, "flops": 2e9, "wall_s": 2.0}
EVAL = {"event": "eval", "step": 4, "val_loss": 4.25, "tokens": 400, "flops": 2e9, "wall_s": 2.0,
        "energy_kwh": 1e-6, "emissions_kg": 4e-7}


def test_wandb_offline_and_trackio_get_the_same_numbers(tmp_path, monkeypatch):
    calls = _fake_modules(monkeypatch)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    out = tmp_path / "run"
    out.mkdir()
    cfg = RunConfig(out=str(out))
    with Trackers(["wandb,trackio"], out, cfg) as track:
        track({"event": "start", "steps": 10})  # nothing to track
        track(STEP)
        track(EVAL)
    inits = [c[1] for c in calls if c[0] == "init"]
    wandb_init, trackio_init = inits
    assert wandb_init["mode"] == "offline" and wandb_init["dir"] == str(out) and wandb_init["name"] == str(out)
    assert wandb_init["settings"]["console"] == "off" and wandb_init["config"]["train"]["report_to"] == []
    run_id = (out / "wandb" / "apollo-run-id").read_text()
    assert wandb_init["id"] == run_id and trackio_init["project"] == "apollo" and trackio_init["resume"] == "never"
    assert ("define_metric", "*", "global_step") in calls
    logs = [c for c in calls if c[0] == "log"]
    step_values = scalars(STEP)
    assert step_values["train/depth"] == 4.0 and step_values["train/tokens_per_s"] == 200.0
    assert logs == [("log", {"global_step": 3, **step_values}, None), ("log", step_values, 3),
                    ("log", {"global_step": 4, "eval/val_loss": 4.25, "eval/energy_kwh": 1e-6,
                             "eval/emissions_kg": 4e-7}, None),
                    ("log", {"eval/val_loss": 4.25, "eval/energy_kwh": 1e-6, "eval/emissions_kg": 4e-7}, 4)]
    assert [c for c in calls if c[0] == "finish"] == [("finish",), ("finish",)]
    # a resumed run continues the same wandb run id (and trackio run name); WANDB_MODE set by the user wins
    monkeypatch.setenv("WANDB_MODE", "online")
    calls.clear()
    Trackers(["wandb", "trackio"], out, cfg, first=4, resumed=True).close()
    wandb_init, trackio_init = [c[1] for c in calls if c[0] == "init"]
    assert wandb_init["id"] == run_id and wandb_init["mode"] == "online" and trackio_init["resume"] == "allow"


def test_no_trackers_is_a_no_op(tmp_path):
    with Trackers([], tmp_path, RunConfig(out=str(tmp_path))) as track:
        track(STEP)
    assert list(tmp_path.iterdir()) == []
