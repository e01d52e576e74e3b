"""--energy: summary.json's energy fields with codecarbon (a real tiny run) and without it (nulls, no crash, or one
line with --energy on); energy in the eval records, across a resume; the compare table's energy columns."""

from __future__ import annotations

import csv
import json
import sys
import tempfile
from pathlib import Path

import pytest

from apollo.cli import main
from apollo.measure.report import report_dir, summarize
from tests.test_report import SCRATCH, fake_run
from tests.test_trackers import TINY

TRAIN = ["train", "--preset", "gpt-tiny", "--method", "apollo", *TINY, "--steps", "20", "--eval-every", "5"]
ENERGY_KEYS = ("energy_kwh", "emissions_kg", "energy_method", "energy_detail")


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def records(run: Path, event: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["event"] == event]


def test_codecarbon_run_has_energy_in_summary_and_evals(tmp_path, monkeypatch):
    pytest.importorskip("codecarbon")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # codecarbon must write nothing where the user stands, nor a lock file in /tmp
    lock = Path(tempfile.gettempdir()) / ".codecarbon.lock"
    had_lock = lock.exists()
    run = tmp_path / "run"
    assert main([*TRAIN, "--energy", "on", "--country-iso-code", "fra", "--checkpoint-every", "10",
                 "--out", str(run)]) == 0
    s = summary(run)
    assert s["energy_kwh"] > 0 and s["emissions_kg"] > 0
    assert s["energy_method"].startswith(("measured: ", "estimated: ")) and "CPU" in s["energy_method"]
    d = s["energy_detail"]
    assert d["country_iso_code"] == "FRA" and d["tracking_mode"] == "process" and "evaluation" in d["interval"]
    assert d["cpu_kwh"] + d["gpu_kwh"] + d["ram_kwh"] == pytest.approx(s["energy_kwh"])
    evals = records(run, "eval")
    energy = [e["energy_kwh"] for e in evals]
    assert len(energy) == 4 and all(b > a > 0 for a, b in zip(energy, energy[1:], strict=False))
    assert energy[-1] == s["energy_kwh"] and evals[-1]["emissions_kg"] == s["emissions_kg"]
    assert list(cwd.iterdir()) == [] and lock.exists() == had_lock
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml", "metrics.jsonl", "model",
                                                     "summary.json"]
    # a resumed run goes on counting from its checkpoint's energy
    (run / "summary.json").unlink()
    assert main(["train", "--resume", str(run)]) == 0
    resumed = records(run, "eval")
    assert [e["step"] for e in resumed] == [5, 10, 15, 20] and resumed[1]["energy_kwh"] == energy[1]
    assert resumed[3]["energy_kwh"] > resumed[2]["energy_kwh"] > energy[1]
    assert summary(run)["energy_kwh"] == resumed[3]["energy_kwh"]


def test_energy_does_not_change_the_run(tmp_path):
    pytest.importorskip("codecarbon")
    for name, energy in (("off", "off"), ("on", "on")):
        argv = [*TRAIN, "--method", "scratch", "--steps", "10", "--energy", energy, "--out", str(tmp_path / name)]
        assert main(argv) == 0

    def losses(run):
        return [r["loss"] for r in records(run, "step")] + [r["val_loss"] for r in records(run, "eval")]

    assert losses(tmp_path / "on") == losses(tmp_path / "off")
    off = summary(tmp_path / "off")
    assert off["energy_kwh"] is None and off["energy_method"] == "not measured (--energy off)"
    assert "energy_kwh" not in records(tmp_path / "off", "eval")[0]  # off: the log is as it always was


def test_without_codecarbon_auto_gives_nulls_and_on_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "codecarbon", None)  # import fails as if it were not installed
    run = tmp_path / "auto"
    assert main([*TRAIN, "--method", "scratch", "--steps", "10", "--energy", "auto", "--out", str(run)]) == 0
    s = summary(run)
    assert all(k in s for k in ENERGY_KEYS) and s["energy_kwh"] is None and s["emissions_kg"] is None
    assert s["energy_method"] == "not measured: codecarbon is not installed (pip install codecarbon)"
    assert "energy_kwh" not in records(run, "eval")[-1]
    capsys.readouterr()
    assert main([*TRAIN, "--energy", "on", "--out", str(tmp_path / "on")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "apollo: error: --energy on needs codecarbon: pip install codecarbon"
    assert not (tmp_path / "on").exists()


@pytest.mark.parametrize("args,message", [
    (("--energy", "yes"), "unknown --energy 'yes' (choose from off, auto, on)"),
    (("--energy", "auto", "--energy-tracking-mode", "node"), "unknown --energy-tracking-mode 'node'"),
    (("--energy", "auto", "--country-iso-code", "FR"), "--country-iso-code must be a 3-letter ISO code"),
])
def test_bad_energy_settings_are_one_line(tmp_path, capsys, args, message):
    assert main([*TRAIN, *args, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and not (tmp_path / "run").exists()


def test_unknown_country_is_refused(tmp_path, capsys):
    pytest.importorskip("codecarbon")
    assert main([*TRAIN, "--energy", "on", "--country-iso-code", "XYZ", "--out", str(tmp_path / "run")]) == 2
    assert "--country-iso-code 'XYZ' is not in codecarbon's energy-mix table" in capsys.readouterr().err


def energy_run(root, name, evals, kwh, method="estimated: CPU estimated from TDP x CPU load"):
    """A fake run whose evals (flops, wall_s, val_loss) carry cumulative energy ``kwh`` (one per eval)."""
    run = fake_run(root, name, evals, steps=[(0, 4, (4,), 1000, evals[-1][1])],
                   summary={"test_loss": None, "energy_kwh": kwh[-1], "emissions_kg": kwh[-1] * 0.4,
                            "energy_method": method})
    lines = (run / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in lines]
    k = iter(kwh)
    for r in rows:
        if r["event"] == "eval":
            r["energy_kwh"] = next(k)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


FAST = [(0.5e12, 6.0, 4.0), (1e12, 12.0, 3.5), (2e12, 22.0, 2.5)]  # reaches 3.0 halfway between evals 2 and 3


def test_report_shows_energy_columns(tmp_path):
    runs = {"scratch": energy_run(tmp_path, "scratch", SCRATCH, [0.01, 0.02, 0.04]),
            "fast": energy_run(tmp_path, "fast", FAST, [0.005, 0.01, 0.02]),
            "plain": fake_run(tmp_path, "plain", FAST, steps=[(0, 4, (4,), 10, 22.0)])}  # no --energy
    rows = {r.method: r for r in summarize(runs)[0]}
    assert rows["fast"].energy_kwh == 0.02 and rows["fast"].energy_kwh_to_target == pytest.approx(0.015)
    assert rows["scratch"].energy_kwh_to_target == 0.04 and rows["plain"].energy_kwh is None
    out = tmp_path / "report"
    out.mkdir()
    header, _, *lines = report_dir(out, runs, "hand-made").splitlines()
    assert [c.strip() for c in header.strip("|").split("|")][-3:] == ["kWh", "kWh to target", "kg CO2eq"]
    cells = {c[0]: c for c in ([x.strip() for x in row.strip("|").split("|")] for row in lines)}
    assert cells["scratch"][-3:] == ["0.04", "0.04", "0.016"] and cells["fast"][-3:] == ["0.02", "0.015", "0.008"]
    assert cells["plain"][-3:] == ["n/a", "n/a", "n/a"]
    md = (out / "results.md").read_text()
    assert "Energy (`--energy`, codecarbon)" in md and "`estimated: CPU estimated from TDP x CPU load`" in md
    with open(out / "results.csv", newline="") as f:
        csv_rows = {r["method"]: r for r in csv.DictReader(f)}
    assert float(csv_rows["fast"]["energy_kwh_to_target"]) == pytest.approx(0.015)
    assert csv_rows["plain"]["energy_kwh"] == "" and csv_rows["scratch"]["energy_method"].startswith("estimated")


def test_report_without_energy_keeps_its_columns(tmp_path):
    runs = {"scratch": fake_run(tmp_path, "scratch", SCRATCH, steps=[(0, 4, (4,), 10, 40.0)])}
    out = tmp_path / "report"
    out.mkdir()
    header = report_dir(out, runs, "hand-made").splitlines()[0]
    assert header.endswith("| FLOPs saving | wall saving |") and "Energy" not in (out / "results.md").read_text()
