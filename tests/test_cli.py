"""The command line: a real run, and bad input -> one line on stderr, exit code 2, nothing written."""

import json
import subprocess
import sys

import pytest

from apollo.cli import main

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


def _write(tmp_path, name, content: bytes):
    p = tmp_path / name
    p.write_bytes(content)
    return str(p)


BAD = [
    (["--preset", "bert-huge"], "unknown preset"),
    (["--method", "apolo"], "unknown method"),
    (["--sampler", "lvsp"], "unknown sampler"),
    (["--growth", "sideways"], "unknown growth"),
    (["--moments", "keep"], "unknown moments"),
    (["--stages", "1,6,3,12", "--switch", "0.1,0.2,0.3"], "strictly increasing"),
    (["--stages", "1,3,6", "--switch", "0.1,0.2"], "end at the model depth"),
    (["--stages", "0,6,12", "--switch", "0.1,0.2"], ">= 1"),
    (["--stages", "1,6,12", "--switch", "0.3,0.2"], "strictly increasing"),
    (["--stages", "1,6,12", "--switch", "0.1,1.2"], "inside the run"),
    (["--batch-size", "0"], "batch-size"),
    (["--lr", "-1"], "lr"),
    (["--hidden", "abc"], "expected int"),
    (["--data", "/nonexistent/corpus.txt"], "corpus.txt"),
    (["--bogus-flag", "1"], "unrecognized arguments"),
    (["--method", "bert2bert"], "needs --small-model"),
    (["--method", "scratch", "--small-model", "/nonexistent"], "used only by bert2bert and ligo"),
    (["--method", "ligo", "--small-model", "/nonexistent/run"], "no trained model"),
    (["--method", "bert2bert", "--small-model", "x", "--width-init", "wide"], "unknown width init"),
    (["--method", "ligo", "--small-model", "x", "--width-init", "aki"], "starts from FPI"),
]


@pytest.mark.parametrize("args, message", BAD)
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, args, message):
    argv = ["train", "--preset", "bert-tiny", *TINY, "--steps", "20", "--out", str(tmp_path / "run")]
    if args[0] == "--preset":
        argv[2] = args[1]
        args = []
    with pytest.raises(SystemExit) if args and args[0] == "--bogus-flag" else _nullcontext() as exc:
        code = main(argv + args)
    if exc is not None:
        code = exc.value.code
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("apollo: error:") and message in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", ["empty", "binary", "non-utf8", "directory"])
def test_bad_data_files(tmp_path, capsys, kind):
    path = {"empty": lambda: _write(tmp_path, "e.txt", b"\n\n"),
            "binary": lambda: _write(tmp_path, "b.txt", b"abc\x00\x01\x02"),
            "non-utf8": lambda: _write(tmp_path, "n.txt", "caf\xe9 au lait\n".encode("latin-1")),
            "directory": lambda: str(tmp_path)}[kind]()
    code = main(["train", "--preset", "gpt-tiny", *TINY, "--steps", "20", "--data", path,
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "apollo: error:" in err
    assert not (tmp_path / "run").exists()


def test_real_entry_point_has_no_traceback(tmp_path):
    r = run_cli("compare", "--preset", "bert-tiny", "--methods", "scratch,apolo", "--out", str(tmp_path / "c"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == ("apollo: error: unknown method 'apolo' "
                                "(choose from scratch, stackbert, apollo, apollo-plus, bert2bert, ligo)")


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
