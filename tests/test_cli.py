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
