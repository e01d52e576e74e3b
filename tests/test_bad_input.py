"""Bad input, table-driven: each case is one line on stderr naming the problem, exit code 2, no traceback, and
nothing in the working folder written, changed or deleted (an earlier run and its checkpoints included)."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_model

from apollo.cli import main
from apollo.config import DataConfig, MethodConfig, ModelConfig, RunConfig, TrainConfig
from apollo.data import synthetic_corpus, train_tokenizer
from apollo.models import build_model
from apollo.runtime.checkpoint import saved
from apollo.runtime.train import train

TINY = ["--layers", "12", "--hidden", "32", "--heads", "2", "--ffn", "64", "--vocab", "512", "--seq-len", "16",
        "--batch-size", "8", "--synthetic-sentences", "1500", "--eval-blocks", "8", "--no-progress", "--steps", "20"]


@dataclass(frozen=True)
class Case:
    """``args`` follow ``train --preset bert-tiny TINY --out {tmp}/run`` unless they start with a command.
    ``{tmp}`` is the case's folder, ``{run}`` an interrupted run with checkpoints (copied there by ``setup``)."""

    id: str
    args: tuple[str, ...]
    message: str
    setup: Callable[[Path, Path], None] | None = None


# 400 distinct sentences of > 40 characters: enough text for a few blocks
LONG_TEXT = "\n".join(f"sentence number {i} is long enough to count as a line of text" for i in range(400)).encode()


def _file(name: str, content: bytes) -> Callable[[Path, Path], None]:
    return lambda tmp, _: (tmp / name).write_bytes(content)


def _run(edit: Callable[[Path], None] | None = None) -> Callable[[Path, Path], None]:
    """Copy the interrupted run to {tmp}/run-ckpt, then apply ``edit`` to its latest checkpoint."""
    def setup(tmp: Path, trained: Path) -> None:
        shutil.copytree(trained, tmp / "run-ckpt")
        if edit:
            edit(saved(tmp / "run-ckpt")[-1])
    return setup


def _truncate(name: str) -> Callable[[Path], None]:
    def edit(ckpt: Path) -> None:
        data = (ckpt / name).read_bytes()
        (ckpt / name).write_bytes(data[: len(data) // 2])
    return edit


def _foreign_weights(ckpt: Path) -> None:  # a same-named file from another model (hidden 48)
    m = ModelConfig("gpt2", layers=6, hidden=48, heads=2, ffn=64, vocab=512, seq_len=16)
    save_model(build_model(m, 6, 0), str(ckpt / "model.safetensors"))


class _Payload:
    def __reduce__(self):
        return print, ("this ran",)


def _tokenizer(arch: str, vocab: int) -> Callable[[Path, Path], None]:
    def setup(tmp: Path, _: Path) -> None:
        train_tokenizer(synthetic_corpus(300), arch, vocab).save_pretrained(tmp / "tok")
    return setup


def _small_model(seq_len: int, vocab: int = 512) -> Callable[[Path, Path], None]:
    def setup(tmp: Path, _: Path) -> None:
        m = ModelConfig("bert", layers=12, hidden=16, heads=1, ffn=32, vocab=vocab, seq_len=seq_len)
        build_model(m, 12, 0).save_pretrained(tmp / "small" / "model")
    return setup


def _apollo_dir(tmp: Path, _: Path) -> None:
    (tmp / "run").mkdir()
    (tmp / "run" / "config.yaml").write_text("out: run\n")
    (tmp / "run" / "metrics.jsonl").write_text("{}\n")


R = ("train", "--resume", "{tmp}/run-ckpt")
CASES = [
    # names and policies
    Case("unknown-preset", ("--preset", "bert-huge"), "unknown preset"),
    Case("unknown-method", ("--method", "apolo"), "unknown method"),
    Case("unknown-sampler", ("--sampler", "lvsp"), "unknown sampler"),
    Case("unknown-growth", ("--growth", "sideways"), "unknown growth"),
    Case("unknown-moments", ("--moments", "keep"), "unknown moments"),
    Case("unknown-new-layers", ("--new-layers", "fresh"), "unknown new-layers policy"),
    Case("zero-layers-sampled", ("--stages", "0,12", "--switch", "0.5"), "a zero-layer first stage needs"),
    Case("zero-layers-copied", ("--method", "zero-layer", "--new-layers", "copy"), "a zero-layer first stage needs"),
    Case("zero-layers-only", ("--method", "scratch", "--stages", "0"), "stages must start at >= 1"),
    Case("unknown-switch-unit", ("--stages", "1,6,12", "--switch", "1,2", "--switch-unit", "weeks"),
         "unknown switch unit"),
    Case("unknown-flag", ("--bogus-flag", "1"), "unrecognized arguments"),
    # stages and switch points
    Case("stages-not-increasing", ("--stages", "1,6,3,12", "--switch", "0.1,0.2,0.3"), "strictly increasing"),
    Case("stages-not-at-depth", ("--stages", "1,3,6", "--switch", "0.1,0.2"), "end at the model depth"),
    Case("stages-start-below-0", ("--stages=-1,6,12", "--switch", "0.1,0.2"), ">= 1"),
    Case("switch-out-of-order", ("--stages", "1,6,12", "--switch", "0.3,0.2"), "strictly increasing"),
    Case("switch-beyond-run", ("--stages", "1,6,12", "--switch", "0.1,1.2"), "inside the run"),
    Case("switch-step-beyond-run", ("--stages", "1,6,12", "--switch", "5,25", "--switch-unit", "step"),
         "inside the run of 20 steps"),
    Case("switch-count", ("--stages", "1,6,12", "--switch", "0.5"), "need 2 switch points"),
    # numbers
    Case("batch-zero", ("--batch-size", "0"), "--batch-size must be > 0"),
    Case("batch-negative", ("--batch-size", "-4"), "--batch-size must be > 0"),
    Case("lr-negative", ("--lr", "-1"), "--lr must be > 0"),
    Case("lr-zero", ("--lr", "0"), "--lr must be > 0"),
    Case("steps-negative", ("--steps", "-5"), "--steps must be >= 0"),
    Case("no-run-length", ("--steps", "0", "--tokens", "0"), "set the run length"),
    Case("grad-accum-zero", ("--grad-accum", "0"), "--grad-accum must be > 0"),
    Case("hidden-not-int", ("--hidden", "abc"), "expected int"),
    Case("hidden-heads", ("--hidden", "30", "--heads", "4"), "divisible by --heads"),
    Case("seq-len-tiny", ("--seq-len", "2"), "--seq-len must be >= 4"),
    Case("dropout", ("--dropout", "1.5"), "--dropout must be in [0, 1)"),
    Case("warmup", ("--warmup", "2"), "--warmup must be in [0, 1)"),
    Case("valid-fraction", ("--valid-fraction", "0"), "--valid-fraction must be in (0, 1)"),
    Case("mlm-probability", ("--mlm-probability", "1.5"), "--mlm-probability must be in (0, 1)"),
    Case("checkpoint-every", ("--checkpoint-every", "-1"), "--checkpoint-every must be >= 0"),
    Case("keep-checkpoints", ("--keep-checkpoints", "-2"), "--keep-checkpoints must be >= 0"),
    Case("unknown-precision", ("--precision", "fp8"), "unknown precision 'fp8'"),
    Case("unknown-device", ("--device", "tpu"), "unknown device 'tpu'"),
    Case("global-batch-not-multiple", ("--global-batch", "20"), "--global-batch 20 is not a multiple of --batch-size"),
    Case("unknown-arch", ("--arch", "t5"), "arch"),
    Case("layers-cannot-fit", ("--layers", "100000"), "this run needs about"),
    Case("hidden-cannot-fit", ("--hidden", "1000000", "--heads", "4"), "this run needs about"),
    Case("vocab-cannot-fit", ("--vocab", "100000000"), "this run needs about"),
    Case("gpt-vocab", ("--preset", "gpt-tiny", "--vocab", "100"), "vocab >= 257"),
    # data files
    Case("data-missing", ("--data", "/nonexistent/corpus.txt"), "data file not found: /nonexistent/corpus.txt"),
    Case("data-empty", ("--data", "{tmp}/e.txt"), "data file has no text", _file("e.txt", b"\n\n")),
    Case("data-binary", ("--data", "{tmp}/b.txt"), "binary", _file("b.txt", b"abc\x00\x01\x02")),
    Case("data-non-utf8", ("--data", "{tmp}/n.txt"), "not UTF-8",
         _file("n.txt", "caf\xe9 au lait\n".encode("latin-1"))),
    Case("data-directory", ("--data", "{tmp}"), "is a directory"),
    Case("data-under-one-block", ("--data", "{tmp}/s.txt"), "fewer than one block", _file("s.txt", b"hello world\n")),
    Case("valid-missing", ("--valid", "/nonexistent/valid.txt"), "data file not found"),
    Case("data-fifo", ("--data", "{tmp}/fifo"), "not a regular file (a pipe, socket or device)",
         lambda tmp, _: os.mkfifo(tmp / "fifo")),
    Case("data-twice", ("--data", "{tmp}/c.txt", "{tmp}/c.txt"), "the same data file is given twice",
         _file("c.txt", LONG_TEXT)),
    Case("valid-is-train", ("--data", "{tmp}/c.txt", "--valid", "{tmp}/c.txt"),
         "100% of the validation text's long lines are in the training text", _file("c.txt", LONG_TEXT)),
    Case("batch-over-corpus", ("--batch-size", "5000"), "fewer than one batch of 5000"),
    # tokenizers
    Case("tokenizer-missing", ("--tokenizer", "/nonexistent/tok"), "cannot load tokenizer"),
    Case("tokenizer-corrupt", ("--tokenizer", "{tmp}/tok"), "cannot load tokenizer",
         lambda tmp, _: ((tmp / "tok").mkdir(), (tmp / "tok" / "tokenizer.json").write_text("{garbage"))),
    Case("tokenizer-vocab-too-big", ("--tokenizer", "{tmp}/tok", "--vocab", "64"), "more than model vocab 64",
         _tokenizer("bert", 512)),
    Case("tokenizer-wrong-arch", ("--tokenizer", "{tmp}/tok"), "lacks cls_token, sep_token, mask_token",
         _tokenizer("gpt2", 512)),
    # growth from a small model
    Case("bert2bert-no-small", ("--method", "bert2bert"), "needs --small-model"),
    Case("small-with-scratch", ("--method", "scratch", "--small-model", "/nonexistent"), "used only by bert2bert"),
    Case("small-missing", ("--method", "ligo", "--small-model", "/nonexistent/run"), "no trained model"),
    Case("width-init", ("--method", "bert2bert", "--small-model", "x", "--width-init", "wide"), "unknown width init"),
    Case("ligo-width-init", ("--method", "ligo", "--small-model", "x", "--width-init", "aki"), "starts from FPI"),
    Case("seq-len-beyond-small-positions", ("--method", "bert2bert", "--small-model", "{tmp}/small"),
         "8 positions", _small_model(seq_len=8)),
    Case("small-vocab", ("--method", "bert2bert", "--small-model", "{tmp}/small"), "vocab 600",
         _small_model(seq_len=16, vocab=600)),
    # YAML configs
    Case("yaml-malformed", ("--config", "{tmp}/c.yaml"), "cannot read config", _file("c.yaml", b"model: [1, 2\n")),
    Case("yaml-not-mapping", ("--config", "{tmp}/c.yaml"), "must be a mapping", _file("c.yaml", b"- a\n- b\n")),
    Case("yaml-unknown-key", ("--config", "{tmp}/c.yaml"), "unknown config key model.hiden (did you mean 'hidden'?)",
         _file("c.yaml", b"model:\n  hiden: 64\n")),
    Case("yaml-unknown-section", ("--config", "{tmp}/c.yaml"), "unknown config key 'trian' (did you mean 'train'?)",
         _file("c.yaml", b"trian:\n  lr: 0.1\n")),
    Case("yaml-wrong-type", ("--config", "{tmp}/c.yaml"), "train.lr: expected float, got 'fast'",
         _file("c.yaml", b"train:\n  lr: fast\n")),
    Case("yaml-missing", ("--config", "{tmp}/none.yaml"), "cannot read config"),
    Case("yaml-python-tag", ("--config", "{tmp}/c.yaml"), "cannot read config",
         _file("c.yaml", b"out: !!python/object/apply:os.system ['echo hacked']\n")),
    # run directories
    Case("run-exists", (), "already exists (use --overwrite", _apollo_dir),
    Case("overwrite-foreign-dir", ("--overwrite",), "does not look like an apollo run directory",
         lambda tmp, _: ((tmp / "run").mkdir(), (tmp / "run" / "thesis.tex").write_text("years of work"))),
    Case("out-is-file", (), "is not a directory", _file("run", b"a file")),
    # resuming
    Case("resume-nowhere", ("train", "--resume", "{tmp}/nothing"), "not an apollo run directory"),
    Case("resume-no-checkpoint", ("train", "--resume", "{tmp}/run"), "no checkpoint in", _apollo_dir),
    Case("resume-truncated-weights", R, "model.safetensors is truncated or corrupt",
         _run(_truncate("model.safetensors"))),
    Case("resume-truncated-state", R, "state.pt is truncated or corrupt", _run(_truncate("state.pt"))),
    Case("resume-truncated-optimizer", R, "optimizer.pt is truncated or corrupt", _run(_truncate("optimizer.pt"))),
    Case("resume-foreign-weights", R, "does not fit this model", _run(_foreign_weights)),
    Case("resume-foreign-state", R, "not an apollo checkpoint",
         _run(lambda c: torch.save({"epoch": 3, "model": {}}, c / "state.pt"))),
    Case("resume-incomplete", R, "incomplete or not an apollo checkpoint (missing tokenizer)",
         _run(lambda c: shutil.rmtree(c / "tokenizer"))),
    Case("resume-pickle-payload", R, "refusing to load",
         _run(lambda c: torch.save({"format": 1, "payload": _Payload()}, c / "state.pt"))),
    Case("resume-config-change", (*R, "--hidden", "64"), "model.hidden: 32 -> 64", _run()),
    Case("resume-and-overwrite", (*R, "--overwrite"), "choose one", _run()),
    Case("resume-and-preset", (*R, "--preset", "gpt-tiny"), "the run's own config", _run()),
    Case("resume-other-out", (*R, "--out", "{tmp}/elsewhere"), "names another", _run()),
    Case("resume-finished", R, "already finished", _run(lambda c: (c.parents[1] / "summary.json").write_text("{}"))),
    Case("allow-change-without-resume", ("--allow-config-change",), "only with --resume"),
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """An interrupted GPT-2 run (6 layers, stages 1-3-6) with checkpoints at steps 4 and 8."""
    out = tmp_path_factory.mktemp("trained") / "run"
    m = ModelConfig("gpt2", layers=6, hidden=32, heads=2, ffn=64, vocab=512, seq_len=16)
    t = TrainConfig(batch_size=8, steps=12, eval_every=4, eval_blocks=8, progress=False, checkpoint_every=4)
    train(RunConfig(model=m, method=MethodConfig("apollo", stages=(1, 3, 6), switch=(4, 8), switch_unit="step"),
                    train=t, data=DataConfig(synthetic_sentences=1200), out=str(out)))
    (out / "summary.json").unlink()
    shutil.rmtree(out / "model")
    return out


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def test_there_are_at_least_40_cases():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_is_written(tmp_path, capsys, trained, case):
    if case.setup:
        case.setup(tmp_path, trained)
    capsys.readouterr()  # what the setup printed
    args = [a.replace("{tmp}", str(tmp_path)) for a in case.args]
    preset, args = (args[1], args[2:]) if args[:1] == ["--preset"] else ("bert-tiny", args)
    argv = args if args[:1] == ["train"] else ["train", "--preset", preset, *TINY, "--out", str(tmp_path / "run"),
                                               *args]
    before = _snapshot(tmp_path)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    err = err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("apollo: error:") and case.message in err, err
    assert "this ran" not in out and "Traceback" not in err
    assert _snapshot(tmp_path) == before
