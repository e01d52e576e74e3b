"""The command line: a real run, and bad input -> one line on stderr, exit code 2, nothing written."""

import json
import subprocess
import sys

TINY = ["--layers", "12", "--hidden", "32", "--heads", "2", "--ffn", "64", "--vocab", "512", "--seq-len", "16",
        "--batch-size", "8", "--synthetic-sentences", "1500", "--eval-blocks", "8", "--no-progress"]


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "apollo", *args], capture_output=True, text=True, cwd=cwd)


def test_train_command_writes_a_run_directory(tmp_path):
    out = tmp_path / "run"
    r = run_cli("train", "--preset", "gpt-tiny", "--method", "apollo", *TINY, "--steps", "20", "--eval-every", "10",
                "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "final val loss" in r.stdout and "synthetic" in r.stdout
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "model/config.json", "model/model.safetensors",
                 "model/tokenizer.json"):
        assert (out / name).exists(), name
    assert json.loads((out / "summary.json").read_text())["layers"] == 12
    # the resolved config reproduces the run
    r2 = run_cli("train", "--config", str(out / "config.yaml"), "--out", str(tmp_path / "again"))
    assert r2.returncode == 0, r2.stderr
    assert (tmp_path / "again" / "metrics.jsonl").read_text().splitlines()[1:] == \
        (out / "metrics.jsonl").read_text().splitlines()[1:] or _same_losses(out, tmp_path / "again")


def _same_losses(a, b):
    def losses(d):
        return [r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
                if r["event"] == "step"]
    return losses(a) == losses(b)


def test_data_files_are_used(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(f"line {i} of a small local corpus about cats and dogs ." for i in range(400)))
    r = run_cli("train", "--preset", "bert-tiny", "--method", "stackbert", *TINY, "--steps", "20",
                "--data", str(text), "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    assert "corpus.txt" in r.stdout


# Bad input for `apollo train`: the table in tests/test_bad_input.py.


def test_real_entry_point_has_no_traceback(tmp_path):
    r = run_cli("compare", "--preset", "bert-tiny", "--methods", "scratch,apolo", "--out", str(tmp_path / "c"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == ("apollo: error: unknown method 'apolo' (choose from scratch, stackbert, apollo, "
                                "apollo-plus, bert2bert, ligo, zero-layer, one-layer, gstack, midas, apollo-jump, "
                                "apollo-twostep)")


# --dry-run: the config resolved and checked as a run would, the plan printed, nothing read or written.


def _main(capsys, *argv):
    from apollo.cli import main

    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_train_dry_run_prints_config_and_plan_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.txt").write_text("a line of text\n")
    rc, out, err = _main(capsys, "train", "--preset", "gpt-tiny", "--method", "apollo-jump", "--lr-schedule", "wsd",
                         "--decay-fraction", "0.1", "--tokens", "1500000", "--data", "corpus.txt", "--out", "runs/x",
                         "--dry-run")
    assert rc == 0, err
    assert "method: apollo-jump" in out and "new_layers: zeroed" in out and "lr_schedule: wsd" in out  # resolved
    assert "| stage | live layers | steps |" in out and "38.4% of Scratch's 29.514 TFLOPs" in out  # apollo plan's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt"]  # no run directory


def test_compare_dry_run_plans_every_method_and_the_small_model(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc, out, err = _main(capsys, "compare", "--preset", "gpt-tiny", "--methods", "scratch,apollo-plus,ligo",
                         "--tokens", "300000", "--dry-run")
    assert rc == 0, err
    for row in ("| scratch | 12 | - | fs |", "| apollo-plus | 3 -> 6 -> 12 |", "| ligo | 12 |"):
        assert row in out
    assert "small model for bert2bert / ligo, trained first into runs/compare-gpt-tiny/small" in out
    assert not any(tmp_path.iterdir())


def test_dry_run_bad_input_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "config.yaml").write_text("{}\n")
    cases = [
        (("train", "--preset", "gpt-tiny", "--method", "apolo"), "unknown method 'apolo'"),
        (("train", "--preset", "gpt-tiny", "--method", "bert2bert"), "bert2bert needs --small-model"),
        (("train", "--preset", "gpt-tiny", "--data", "missing.txt"), "data file not found: missing.txt"),
        (("train", "--preset", "gpt-tiny", "--out", "taken"), "run directory taken already exists"),
        (("train", "--preset", "gpt-tiny", "--layers", "100000"), "this run needs about"),
        (("compare", "--preset", "bert-tiny", "--methods", "scratch,apolo"), "unknown method 'apolo'"),
        (("compare", "--preset", "bert-tiny", "--stages", "2,12"), "compare runs each method with its defaults"),
    ]
    for argv, message in cases:
        rc, out, err = _main(capsys, *argv, "--dry-run")
        assert rc == 2 and out == "", argv
        assert err.startswith("apollo: error: ") and message in err and err.count("\n") == 1, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
