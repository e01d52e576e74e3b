"""The report on hand-written run directories: table columns, savings, test loss, depth histograms, plots."""

import csv
import json
import math

import pytest

from apollo.config import MethodConfig, RunConfig, save_yaml
from apollo.measure.report import depth_histograms, first_reach, plot_depth_histograms, report_dir, summarize
from apollo.method.sampling import depth_distribution
from tests.conftest import tiny_model_config


def fake_run(root, name, evals, stages=(4,), steps=(), summary=None, method=None):
    """A run dir: evals are (flops, wall_s, val_loss); steps are (stage, live_layers, depths, tokens, wall_s)."""
    d = root / name
    d.mkdir(parents=True)
    lines = [{"event": "start", "source": "hand-made", "schedule": {"stages": list(stages), "starts": [0]}}]
    lines += [{"event": "step", "step": i, "stage": st, "live_layers": n, "depth": list(ds), "tokens": tok,
               "wall_s": w} for i, (st, n, ds, tok, w) in enumerate(steps)]
    lines += [{"event": "eval", "flops": f, "wall_s": w, "val_loss": v} for f, w, v in evals]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if summary is not None:
        (d / "summary.json").write_text(json.dumps(summary))
    if method is not None:
        save_yaml(RunConfig(model=tiny_model_config(layers=4), method=method), d / "config.yaml")
    return d


SCRATCH = [(1e12, 10.0, 5.0), (2e12, 20.0, 4.0), (4e12, 40.0, 3.0)]
# crosses 3.0 halfway between the 2nd and 3rd eval: 1.5 TFLOPs, 17 s
FAST = [(0.5e12, 6.0, 4.0), (1e12, 12.0, 3.5), (2e12, 22.0, 2.5)]
SLOW = [(1e12, 10.0, 4.5), (3e12, 30.0, 3.2)]
# stage 0 (2 live layers of 4): depths 2,2 | 3,4 | 2,3 -> counts 3/2/1; stage 1 (4 live): always 4
GROWTH_STEPS = [(0, 2, (2, 2), 100, 1.0), (0, 2, (3, 4), 200, 2.0), (0, 2, (2, 3), 300, 3.0),
                (1, 4, (4, 4), 400, 4.0), (1, 4, (4, 4), 500, 5.0)]


def growth_run(root, name="apollo-us", sampler="us"):
    method = MethodConfig("apollo", stages=(2, 4), switch=(0.6,), sampler=sampler)
    return fake_run(root, name, FAST, stages=(2, 4), steps=GROWTH_STEPS, method=method,
                    summary={"test_loss": None})


@pytest.fixture
def runs(tmp_path):
    return {"scratch": fake_run(tmp_path, "scratch", SCRATCH, steps=[(0, 4, (4,), 1000, 50.0)],
                                summary={"tokens_per_s": 1234.4, "test_loss": 2.95}),
            "apollo-es": growth_run(tmp_path, "apollo-es"),
            "slow": fake_run(tmp_path, "slow", SLOW, steps=[(0, 4, (4,), 900, 30.0)])}


def test_first_reach_interpolates_and_reports_never():
    assert first_reach([{"val_loss": v, "flops": f, "wall_s": w} for f, w, v in FAST], 3.0) == (1.5e12, 17.0)
    assert first_reach([{"val_loss": v, "flops": f, "wall_s": w} for f, w, v in SLOW], 3.0) is None


def test_summarize_savings_test_loss_and_throughput(runs):
    rows, target = summarize(runs)
    assert target == 3.0
    by = {r.method: r for r in rows}
    assert list(by) == ["scratch", "apollo-es", "slow"]
    fast = by["apollo-es"]
    assert (fast.flops_to_target, fast.wall_s_to_target) == (1.5e12, 17.0)
    assert math.isclose(fast.flops_saving, 1 - 1.5 / 4) and math.isclose(fast.wall_saving, 1 - 17 / 40)
    assert by["scratch"].flops_saving == 0.0 and by["scratch"].wall_saving == 0.0
    assert by["slow"].flops_saving is None and by["slow"].wall_saving is None
    assert by["scratch"].test_loss == 2.95 and fast.test_loss is None and by["slow"].test_loss is None
    # from summary.json when present, else tokens / wall_s of the last step event
    assert by["scratch"].tokens_per_s == 1234.4
    assert fast.tokens_per_s == 500 / 5.0 and by["slow"].tokens_per_s == 900 / 30.0


def test_without_scratch_there_is_no_target(tmp_path):
    rows, target = summarize({"a": fake_run(tmp_path, "a", FAST, steps=[(0, 4, (4,), 10, 1.0)])})
    assert target is None and rows[0].flops_saving is None and rows[0].final_val_loss == 2.5


def test_report_dir_writes_table_csv_plots_and_depths(runs, tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    table = report_dir(out, runs, "hand-made")
    header, *lines = table.splitlines()
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "method", "final val loss", "test loss", "total TFLOPs", "train s", "tokens/s", "TFLOPs to target",
        "s to target", "FLOPs saving", "wall saving"]
    cells = {row.split("|")[1].strip(): [c.strip() for c in row.strip("|").split("|")] for row in lines[1:]}
    assert cells["scratch"] == ["scratch", "3.0000", "2.9500", "4.00", "40", "1234", "4.00", "40", "0.0%", "0.0%"]
    assert cells["apollo-es"] == ["apollo-es", "2.5000", "n/a", "2.00", "22", "100", "1.50", "17", "62.5%", "57.5%"]
    assert cells["slow"][2] == "n/a" and cells["slow"][6:] == ["never reached"] * 4
    md = (out / "results.md").read_text()
    assert "Target = Scratch's final validation loss: 3.0000" in md and "Data: hand-made" in md and table in md
    with open(out / "results.csv", newline="") as f:
        csv_rows = {r["method"]: r for r in csv.DictReader(f)}
    assert list(next(iter(csv_rows.values()))) == [
        "method", "final_val_loss", "test_loss", "total_flops", "wall_s", "tokens_per_s", "flops_to_target",
        "wall_s_to_target", "flops_saving", "wall_saving", "energy_kwh", "energy_kwh_to_target", "emissions_kg",
        "energy_method"]  # energy: empty without --energy (tests/test_energy.py)
    assert float(csv_rows["apollo-es"]["flops_saving"]) == pytest.approx(0.625)
    assert csv_rows["apollo-es"]["test_loss"] == "" and float(csv_rows["scratch"]["test_loss"]) == 2.95
    for name in ("loss_vs_flops.png", "loss_vs_wall.png", "depth_apollo-es.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG" and (out / name).stat().st_size > 1000
    assert json.loads((out / "depth_apollo-es.json").read_text())[0]["counts"] == {"2": 3, "3": 2, "4": 1}
    # single-stage runs get no depth histogram
    assert not (out / "depth_scratch.png").exists() and not (out / "depth_slow.png").exists()


def test_depth_histogram_counts_and_tv_distance(tmp_path):
    run = growth_run(tmp_path)
    path = tmp_path / "depth.png"
    stages = plot_depth_histograms(run, path, "us")
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert [(s["stage"], s["live_layers"], s["steps"], s["draws"]) for s in stages] == [(0, 2, 3, 6), (1, 4, 2, 4)]
    assert stages[0]["counts"] == {2: 3, 3: 2, 4: 1} and stages[1]["counts"] == {4: 4}
    assert stages[0]["pmf"] == pytest.approx({2: 1 / 3, 3: 1 / 3, 4: 1 / 3}) and stages[1]["pmf"] == {4: 1.0}
    # 0.5 * (|1/2 - 1/3| + |1/3 - 1/3| + |1/6 - 1/3|) = 1/6
    assert stages[0]["tv"] == pytest.approx(1 / 6) and stages[1]["tv"] == 0.0
    saved = json.loads(path.with_suffix(".json").read_text())
    assert saved[0]["counts"] == {"2": 3, "3": 2, "4": 1} and saved[0]["tv"] == pytest.approx(1 / 6)


@pytest.mark.parametrize("sampler", ["none", "fs", "lvps"])
def test_depth_histogram_uses_the_runs_sampler(tmp_path, sampler):
    stage0 = depth_histograms(growth_run(tmp_path, sampler=sampler))[0]
    pmf = depth_distribution(sampler, 2, 4)
    assert stage0["pmf"] == pmf
    emp = {2: 3 / 6, 3: 2 / 6, 4: 1 / 6}
    assert stage0["tv"] == pytest.approx(0.5 * sum(abs(emp[d] - pmf[d]) for d in pmf))
    if sampler == "none":  # point mass at N = 2: TV = 1 - 1/2
        assert stage0["tv"] == pytest.approx(0.5)
    if sampler == "fs":  # point mass at L = 4: TV = 1 - 1/6
        assert stage0["tv"] == pytest.approx(5 / 6)


def test_flat_target_warning_only_when_scratch_reaches_its_final_loss_early():
    from apollo.measure.report import Row, flat_target_warning

    def row(method, saving):
        return Row(method, 6.0, None, 10.0, 1.0, 100.0, 1.0, 0.0, saving, saving)

    assert flat_target_warning([row("scratch", 0.0), row("apollo", 0.4)]) is None
    assert flat_target_warning([row("apollo", 0.4)]) is None
    msg = flat_target_warning([row("scratch", 0.5), row("apollo", 0.6)])
    assert msg is not None and "50%" in msg
