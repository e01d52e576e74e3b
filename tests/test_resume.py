"""Crash safety: SIGKILL at any step then --resume gives bit-identical weights; atomic saves; NaN and full disk.

Kills are real SIGKILLs of a subprocess (tests/killer.py kills itself at an exact step or mid-save).
"""

import ast
import errno
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import apollo.models
import apollo.runtime.checkpoint
import apollo.runtime.train
from apollo.config import ApolloError, DataConfig, MethodConfig, RunConfig, TrainConfig
from apollo.runtime.train import train
from tests.conftest import tiny_model_config

ROOT = Path(__file__).resolve().parents[1]
# 6 layers, stages 1 -> 3 -> 6 growing at steps 6 and 12 of 18; a checkpoint every 4 steps (4, 8, 12, 16).
TINY = ["--layers", "6", "--hidden", "32", "--heads", "2", "--ffn", "64", "--vocab", "512", "--seq-len", "16",
        "--batch-size", "8", "--synthetic-sentences", "1200", "--eval-blocks", "8", "--eval-every", "5",
        "--steps", "18", "--threads", "1", "--no-progress", "--checkpoint-every", "4",
        "--dropout", "0.1"]  # dropout draws from torch's global RNG, which the checkpoint must restore
STAGES = ["--stages", "1,3,6", "--switch", "6,12", "--switch-unit", "step"]
METHODS = {"scratch": [], "stackbert": STAGES, "apollo": STAGES,
           "zero-layer": ["--stages", "0,6", "--switch", "10", "--switch-unit", "step"],
           "midas": ["--stages", "2,4,6", "--switch", "6,12", "--switch-unit", "step"]}
# (kind, point): "step N" dies as step N starts, after the growth at N (6 and 12 are growth steps; checkpoint 12
# is written right before the growth at 12, so resuming from it grows first); "save N" dies while writing
# checkpoint N, leaving a partial temporary directory and the previous checkpoint as the latest.
KILLS = {
    "scratch": [("step", 5), ("step", 15)],
    "stackbert": [("step", 6), ("step", 13), ("save", 16)],
    "apollo": [("step", 3), ("step", 5), ("step", 6), ("step", 10), ("save", 12), ("step", 12), ("step", 15)],
    "zero-layer": [("step", 6), ("step", 10), ("step", 13)],  # twice inside the head-only stage, once after
    "midas": [("step", 7), ("step", 12)],
}


def cli(*args, killer=None):
    pre = [str(ROOT / "tests" / "killer.py"), *killer, "--"] if killer else ["-m", "apollo"]
    return subprocess.run([sys.executable, *pre, *args], capture_output=True, text=True, cwd=ROOT)


def expected_resumes(kills: list[tuple[str, int]]) -> list[int]:
    """The resume records metrics.jsonl keeps: each resume from checkpoint p cuts the log back to p's offset."""
    kept = []
    for kind, point in kills:
        latest = (point - 1) // 4 * 4 if kind == "save" else point // 4 * 4
        if latest:
            kept = [s for s in kept if s < latest] + [latest]
    return kept


def weights(run: Path) -> dict:
    return load_file(run / "model" / "model.safetensors")


def step_records(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    drop = ("wall_s", "save_s")
    return [{k: v for k, v in r.items() if k not in drop} for r in rows if r["event"] not in ("resume", "checkpoint")]


@pytest.mark.parametrize("method", list(METHODS))
def test_killed_and_resumed_run_is_bit_identical(tmp_path, method):
    args = ["train", "--preset", "bert-tiny", "--method", method, *TINY, *METHODS[method]]
    ref = cli(*args, "--out", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr
    run = tmp_path / "run"
    first, *rest = KILLS[method]
    if first == ("step", 3):  # killed before the first checkpoint: nothing to resume, start again
        r = cli(*args, "--out", str(run), killer=["step", "3"])
        assert r.returncode == -9
        r = cli("train", "--resume", str(run))
        assert r.returncode == 2 and "no checkpoint" in r.stderr, r.stderr
        first, *rest = rest
        r = cli(*args, "--out", str(run), "--overwrite", killer=[first[0], str(first[1])])
    else:
        r = cli(*args, "--out", str(run), killer=[first[0], str(first[1])])
    assert r.returncode == -9, r.stderr
    for kind, point in rest:
        r = cli("train", "--resume", str(run), killer=[kind, str(point)])
        assert r.returncode == -9, r.stderr
        if kind == "save":  # the killed save left its partial copy; the latest complete checkpoint is older
            assert (run / "checkpoints" / f".step-{point:08d}.tmp").is_dir()
            assert apollo.runtime.checkpoint.saved(run)[-1].name == f"step-{point - 4:08d}"
    r = cli("train", "--resume", str(run))
    assert r.returncode == 0, r.stderr
    a, b = weights(tmp_path / "ref"), weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert step_records(run) == step_records(tmp_path / "ref")  # same losses, depths, growths, evals
    resumes = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"resume"' in x]
    assert resumes == expected_resumes(KILLS[method])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000012", "step-00000016"]  # keep 2


def tiny(tmp_path, name="run", **train_kw) -> RunConfig:
    t = TrainConfig(**{"batch_size": 8, "steps": 12, "lr": 2e-3, "eval_every": 4, "eval_blocks": 8,
                       "progress": False, "checkpoint_every": 4, **train_kw})
    return RunConfig(model=tiny_model_config("gpt2", layers=6), method=MethodConfig("apollo", stages=(1, 3, 6),
                     switch=(4, 8), switch_unit="step"), train=t, data=DataConfig(synthetic_sentences=1200),
                     out=str(tmp_path / name))


def _nan_at(monkeypatch, bad_steps: set[int]):
    """Make the training loss NaN at the given steps (one micro-batch per step; validation passes are left alone)."""
    calls = {"n": 0}
    lm_loss = apollo.models.lm_loss  # what the training loop's LMLoss module calls

    def patched(model, batch, mlm):
        loss = lm_loss(model, batch, mlm)
        if not model.training:
            return loss
        calls["n"] += 1
        return loss * float("nan") if calls["n"] - 1 in bad_steps else loss

    monkeypatch.setattr(apollo.models, "lm_loss", patched)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    _nan_at(monkeypatch, {6})
    with pytest.raises(ApolloError, match=r"loss nan .* at step 6: stopped; resume from .*step-00000004"):
        train(tiny(tmp_path))
    run = tmp_path / "run"
    assert [p.name for p in apollo.runtime.checkpoint.saved(run)] == ["step-00000004"]
    assert apollo.runtime.checkpoint.load(run).step == 4
    assert not (run / "model").exists()


def test_skip_nonfinite_skips_a_bounded_number_of_bad_steps(tmp_path, monkeypatch):
    _nan_at(monkeypatch, {5, 9})
    summary = train(tiny(tmp_path, skip_nonfinite=2))
    steps = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if '"event": "step"' in x]
    assert [s["step"] for s in steps if s.get("skipped")] == [5, 9]
    assert summary["steps"] == 12 and all(torch.isfinite(p).all() for p in weights(tmp_path / "run").values())
    _nan_at(monkeypatch, {2, 3, 4})  # a third bad step exceeds the allowance
    with pytest.raises(ApolloError, match="at step 4"):
        train(tiny(tmp_path, "again", skip_nonfinite=2))


def test_full_disk_during_a_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    save_model = apollo.runtime.checkpoint.save_model

    def full_disk(model, filename, *args, **kwargs):
        if "step-00000008" in filename:
            Path(filename).write_bytes(b"half a tensor")
            raise OSError(errno.ENOSPC, "No space left on device")
        return save_model(model, filename, *args, **kwargs)

    monkeypatch.setattr(apollo.runtime.checkpoint, "save_model", full_disk)
    with pytest.raises(ApolloError, match=r"no space left on device; the last good checkpoint .*step-00000004 is"):
        train(tiny(tmp_path))
    run = tmp_path / "run"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000004"]  # no partial copy left
    assert apollo.runtime.checkpoint.load(run).step == 4


class _Payload:
    """Unpickling this calls Path.touch(marker): a stand-in for arbitrary code in a malicious checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_a_pickle_payload_in_a_checkpoint_is_refused_not_run(tmp_path):
    train(tiny(tmp_path))
    ckpt = apollo.runtime.checkpoint.saved(tmp_path / "run")[-1]
    marker = tmp_path / "pwned"
    state = torch.load(ckpt / "state.pt", weights_only=True)
    state["counters"] = _Payload(marker)
    (ckpt / "state.pt").write_bytes(pickle.dumps(state))
    pickle.loads((ckpt / "state.pt").read_bytes())  # the payload is live: a plain unpickler runs it
    assert marker.exists()
    marker.unlink()
    (tmp_path / "run" / "summary.json").unlink()  # a finished run is not resumable; make it look interrupted
    r = cli("train", "--resume", str(tmp_path / "run"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("apollo: error: refusing to load") and "state.pt" in r.stderr, r.stderr
    assert not marker.exists()


def test_resume_refuses_a_changed_config_unless_allowed(tmp_path, monkeypatch):
    _nan_at(monkeypatch, {10})
    with pytest.raises(ApolloError):
        train(tiny(tmp_path))  # stops at step 10, checkpoint 8
    run = tmp_path / "run"
    before = (run / "metrics.jsonl").read_bytes()
    r = cli("train", "--resume", str(run), "--lr", "0.001", "--seq-len", "32")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "model.seq_len: 16 -> 32; train.lr: 0.002 -> 0.001" in r.stderr and "--allow-config-change" in r.stderr
    assert (run / "metrics.jsonl").read_bytes() == before  # refused before touching the run
    r = cli("train", "--resume", str(run), "--lr", "0.001", "--allow-config-change", "--threads", "1")
    assert r.returncode == 0, r.stderr
    resume = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"resume"' in x]
    assert resume == [{"event": "resume", "step": 8, "checkpoint": "step-00000008",
                       "config_changes": ["train.lr: 0.002 -> 0.001"]}]


def test_resume_refuses_changed_training_text(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the cat number {i} sat on the mat ." for i in range(600)), encoding="utf-8")
    cfg = tiny(tmp_path)
    cfg = cfg.__class__(**{**cfg.__dict__, "data": DataConfig(data=(str(corpus),))})
    _nan_at(monkeypatch, {10})
    with pytest.raises(ApolloError):
        train(cfg)
    corpus.write_text("\n".join(f"the dog number {i} ran to the park ." for i in range(600)), encoding="utf-8")
    r = cli("train", "--resume", str(tmp_path / "run"))
    assert r.returncode == 2 and "the training data differs from the checkpoint's" in r.stderr, r.stderr


def test_no_code_execution_paths_in_the_package():
    """Safe YAML, weights-only torch.load, no eval/exec/pickle, nothing handed to a shell (checked on the AST)."""
    torch_loads = 0
    for path in (ROOT / "apollo").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                # pickle is imported for its exception class only; calling it is caught below
                assert not {"subprocess", "marshal", "shelve", "dill"} & set(names), (path, names)
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if isinstance(func, ast.Name):
                assert func.id not in ("eval", "exec", "compile", "__import__"), (path, func.id)
                continue
            name = func.attr if isinstance(func, ast.Attribute) else ""
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            assert owner not in ("os", "pickle") or name not in ("system", "popen", "load", "loads"), (path, name)
            if owner == "yaml":
                assert name in ("safe_load", "safe_dump"), (path, name)
            if owner == "torch" and name == "load":
                torch_loads += 1
                assert any(k.arg == "weights_only" and getattr(k.value, "value", None) is True
                           for k in node.keywords), path
    assert torch_loads == 1  # runtime.checkpoint._torch_load


def test_wsd_schedule_resumes_bit_identical_and_is_part_of_the_resume_check(tmp_path):
    args = ["train", "--preset", "bert-tiny", "--method", "apollo", *TINY, *STAGES, "--lr-schedule", "wsd",
            "--decay-fraction", "0.5", "--decay-shape", "1-sqrt"]  # decay over steps 9..17
    assert cli(*args, "--out", str(tmp_path / "ref")).returncode == 0
    run = tmp_path / "run"
    assert cli(*args, "--out", str(run), killer=["step", "14"]).returncode == -9  # resumes from 12, in the decay
    r = cli("train", "--resume", str(run), "--lr-schedule", "cosine")
    assert r.returncode == 2 and "train.lr_schedule: 'wsd' -> 'cosine'" in r.stderr, r.stderr
    assert cli("train", "--resume", str(run)).returncode == 0
    a, b = weights(tmp_path / "ref"), weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert step_records(run) == step_records(tmp_path / "ref")
    lrs = [r["lr"] for r in step_records(run) if r["event"] == "step"]
    assert lrs[9:11] == pytest.approx([lrs[8] * (1 - 0.9 * (1 / 9) ** 0.5), lrs[8] * (1 - 0.9 * (2 / 9) ** 0.5)])


def test_sigterm_checkpoints_the_step_it_interrupts_and_resumes_bit_identical(tmp_path):
    """SIGTERM in the middle of step 6 (no checkpoint due until 1000): step 6 finishes, a checkpoint of 7 steps is
    written, one line says how to continue, exit code 143; the resumed run ends with the uninterrupted weights."""
    args = ["train", "--preset", "gpt-tiny", "--method", "apollo", *TINY, "--stages", "1", "3", "6",
            "--switch", "4", "8", "--switch-unit", "step", "--checkpoint-every", "1000"]
    ref = cli(*args, "--out", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr
    run = tmp_path / "run"
    r = cli(*args, "--out", str(run), killer=["term", "6"])
    assert r.returncode == 143, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.startswith("apollo")]
    assert lines == [f"apollo: SIGTERM at step 7/18: checkpoint written; continue with --resume {run}"], r.stderr
    assert [p.name for p in apollo.runtime.checkpoint.saved(run)] == ["step-00000007"]
    r = cli("train", "--resume", str(run))
    assert r.returncode == 0, r.stderr
    a, b = weights(tmp_path / "ref"), weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert step_records(run) == step_records(tmp_path / "ref")


def test_a_killed_compare_resumes_keeping_what_finished(tmp_path):
    """``apollo compare`` killed inside its second method (SIGKILL): ``compare --resume OUT`` keeps the finished
    first method, resumes the second from its checkpoint, runs the third; the report's numbers are the ones an
    uninterrupted compare writes."""
    import csv

    args = ["compare", "--preset", "gpt-tiny", "--methods", "scratch,stackbert,apollo", *TINY, "--steps", "8"]
    ref = cli(*args, "--out", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "cmp"
    r = cli(*args, "--out", str(out), killer=["again", "6"])  # at step 6 of the second method (stackbert)
    assert r.returncode == -9
    assert (out / "scratch" / "summary.json").exists() and not (out / "stackbert" / "summary.json").exists()
    assert apollo.runtime.checkpoint.saved(out / "stackbert") and not (out / "apollo").exists()
    finished = (out / "scratch" / "summary.json").stat().st_mtime_ns
    r = cli("compare", "--resume", str(out))
    assert r.returncode == 0, r.stderr
    assert (out / "scratch" / "summary.json").stat().st_mtime_ns == finished  # kept, not trained again
    for name in ("scratch", "stackbert", "apollo"):
        a, b = weights(tmp_path / "ref" / name), weights(out / name)
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert step_records(out / name) == step_records(tmp_path / "ref" / name)
    timed = ("wall", "seconds", "tokens_per_s")  # wall-clock columns differ between any two runs
    rows = [[{k: v for k, v in row.items() if not any(w in k for w in timed)}
             for row in csv.DictReader((d / "results.csv").read_text().splitlines())] for d in (tmp_path / "ref", out)]
    assert rows[0] == rows[1] and len(rows[0]) == 3 and "final_val_loss" in rows[0][0]
    r = cli("compare", "--resume", str(out), "--lr", "5e-3")  # a finished method with another config is refused
    assert r.returncode == 2 and "finished with another config" in r.stderr, r.stderr


def test_ligo_killed_in_its_operator_phase_resumes_bit_identical(tmp_path):
    """LiGO's operator steps checkpoint like any other (every --checkpoint-every): killed at operator step 6 of 10,
    the run resumes from operator step 4 and ends with the uninterrupted run's weights and log."""
    small = tmp_path / "small"
    r = cli("train", "--preset", "gpt-tiny", "--method", "scratch", *TINY, "--hidden", "16", "--heads", "1",
            "--ffn", "32", "--steps", "4", "--out", str(small))
    assert r.returncode == 0, r.stderr
    args = ["train", "--preset", "gpt-tiny", "--method", "ligo", "--small-model", str(small), "--ligo-steps", "10",
            *TINY, "--steps", "6"]
    ref = cli(*args, "--out", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr
    run = tmp_path / "run"
    r = cli(*args, "--out", str(run), killer=["operator", "6"])
    assert r.returncode == -9, r.stderr
    state = torch.load(apollo.runtime.checkpoint.saved(run)[-1] / "state.pt", weights_only=True)
    assert state["step"] == 0 and state["operator_step"] == 4
    r = cli("train", "--resume", str(run))
    assert r.returncode == 0, r.stderr
    a, b = weights(tmp_path / "ref"), weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert step_records(run) == step_records(tmp_path / "ref")
    log = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    resumed = [i for i, x in enumerate(log) if x["event"] == "resume"]
    assert len(resumed) == 1 and log[resumed[0]]["checkpoint"] == "step-00000000"
    assert [x["step"] for x in log[resumed[0]:] if x["event"] == "operator_step"] == [4, 5, 6, 7, 8, 9]
