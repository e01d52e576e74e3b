"""Zero-shot BLiMP: scores against direct forward passes, decisions, aggregation, --max-pairs, the CLI's tables and
its errors, on made-up BLiMP-format files and tiny saved GPT-2 and BERT runs."""

import csv
import json
import random
import shutil

import numpy as np
import pytest
import torch
from conftest import tiny_model_config

from apollo.cli import main
from apollo.data import train_tokenizer
from apollo.evaluation import blimp
from apollo.evaluation.finetune import write_table
from apollo.models import build_model

WORDS = "the a cat dog house river walked saw near under big small old red blue tree ran slowly".split()
# (paradigm, field, linguistics_term, pairs): BLiMP spells one field "syntax/semantics", the rest "syntax_semantics"
PARADIGMS = [("longer_bad", "morphology", "agreement", 10), ("longer_good", "morphology", "agreement", 10),
             ("mixed_island", "syntax", "island_effects", 12), ("mixed_binding", "syntax/semantics", "binding", 8)]


def _words(rng, lo=3, hi=7) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(lo, hi)))


def _rows(name, field, term, n, seed):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        base, extra = _words(rng), _words(rng, 2, 3)
        # a causal LM's summed log-prob drops with every token added: "longer_bad" is always right, "longer_good"
        # always wrong, whatever the weights
        good, bad = {"longer_bad": (base, f"{base} {extra}"), "longer_good": (f"{base} {extra}", base)}.get(
            name, (base, _words(rng)))
        rows.append({"sentence_good": good, "sentence_bad": bad, "field": field, "linguistics_term": term,
                     "UID": name, "simple_LM_method": True, "pairID": str(i)})
    return rows


def _write_dir(d):
    d.mkdir(parents=True)
    for k, (name, field, term, n) in enumerate(PARADIGMS):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(name, field, term, n, k)))
    return d


@pytest.fixture(scope="module")
def blimp_dir(tmp_path_factory):
    d = _write_dir(tmp_path_factory.mktemp("blimp") / "data")
    ref = [{"UID": name, "linguistics_term": term, "ngram": 0.5 + k / 10, "lstm": 0.6, "txl": 0.7, "gpt2": 0.9}
           for k, (name, _, term, _) in enumerate(PARADIGMS)]
    ref.append({"UID": "overall", "linguistics_term": "overall", "ngram": 0.1, "lstm": 0.1, "txl": 0.1, "gpt2": 0.1})
    (d / blimp.REFERENCE_FILE).write_text("".join(json.dumps(r) + "\n" for r in ref))
    return d


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run directories (``RUN/model``) of an untrained 2-layer GPT-2 and BERT with tokenizers fit to WORDS."""
    root = tmp_path_factory.mktemp("runs")
    texts = [_words(random.Random(i)) for i in range(300)]
    out = {}
    for arch in ("gpt2", "bert"):
        cfg = tiny_model_config(arch, layers=2)
        cfg = type(cfg)(**{**cfg.__dict__, "seq_len": 64})
        model, tok = build_model(cfg, 2, seed=0), train_tokenizer(texts, arch, cfg.vocab)
        model.save_pretrained(root / arch / "model")
        tok.save_pretrained(root / arch / "model")
        out[arch] = root / arch
    return out


SENTENCES = ["the cat saw a dog", "red tree", "a big old house near the river ran slowly"]  # unequal: padded


def test_causal_score_is_the_summed_log_softmax_of_a_forward_pass(runs):
    model, tok, masked = blimp.load_lm(runs["gpt2"])
    assert not masked and tok.bos_token_id is not None
    scores = blimp.sentence_scores(model, tok, masked, SENTENCES)
    for s, score in zip(SENTENCES, scores, strict=True):
        ids = [tok.bos_token_id] + tok(s, add_special_tokens=False)["input_ids"]  # the first word is scored too
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        expected = sum(float(logp[i - 1, ids[i]]) for i in range(1, len(ids)))
        assert score == pytest.approx(expected, abs=1e-4)
        without_first = sum(float(logp[i - 1, ids[i]]) for i in range(2, len(ids)))
        assert abs(score - without_first) > 1e-2  # a missing first token would show


def test_masked_score_is_the_pseudo_log_likelihood(runs):
    model, tok, masked = blimp.load_lm(runs["bert"])
    assert masked
    scores = blimp.sentence_scores(model, tok, masked, SENTENCES)
    for s, score in zip(SENTENCES, scores, strict=True):
        ids = tok(s)["input_ids"]
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
        expected = 0.0
        for i in range(1, len(ids) - 1):  # mask one token at a time; [CLS] and [SEP] are not scored
            x = torch.tensor([ids])
            x[0, i] = tok.mask_token_id
            with torch.no_grad():
                expected += float(torch.log_softmax(model(x).logits[0, i].double(), -1)[ids[i]])
        assert score == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_accuracy_is_the_pairwise_decisions(runs, blimp_dir, tmp_path, arch):
    paradigms = blimp.load(str(blimp_dir))
    r = blimp.score_run(runs[arch], paradigms, tmp_path / "out", log=lambda _: None)
    assert r["pairs"] == 40 and r["model"] == ("masked" if arch == "bert" else "causal")
    model, tok, masked = blimp.load_lm(runs[arch])
    for name, pairs in paradigms.items():  # the model's own scores, good and bad scored in separate calls
        good = blimp.sentence_scores(model, tok, masked, [p.good for p in pairs])
        bad = blimp.sentence_scores(model, tok, masked, [p.bad for p in pairs])
        assert r["accuracy"]["paradigm"][name] == pytest.approx(100 * np.mean(np.array(good) > np.array(bad)))
    if arch == "gpt2":
        assert r["accuracy"]["paradigm"]["longer_bad"] == 100.0 and r["accuracy"]["paradigm"]["longer_good"] == 0.0
    with open(tmp_path / "out" / "pairs.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 40 and {row["paradigm"] for row in rows} == {p[0] for p in PARADIGMS}
    assert all(int(row["correct"]) == (float(row["score_good"]) > float(row["score_bad"])) for row in rows)
    assert json.loads((tmp_path / "out" / "result.json").read_text())["accuracy"] == r["accuracy"]


def test_aggregation_per_field_term_and_overall(blimp_dir):
    paradigms = blimp.load(str(blimp_dir))
    assert paradigms["mixed_binding"][0].field == "syntax_semantics"  # "syntax/semantics" joins its field
    acc = {"longer_bad": 100.0, "longer_good": 0.0, "mixed_island": 75.0, "mixed_binding": 37.5}
    a = blimp.aggregate(paradigms, acc)
    assert a["paradigm"] == acc
    assert a["field"] == {"morphology": 50.0, "syntax": 75.0, "syntax_semantics": 37.5}
    assert a["term"] == {"agreement": 50.0, "binding": 37.5, "island_effects": 75.0}
    assert a["overall"] == pytest.approx((100 + 0 + 75 + 37.5) / 4)  # mean over paradigms (12 and 8 pairs alike)
    ref = blimp.reference(str(blimp_dir), paradigms)  # the file's "overall" row is not a paradigm
    assert list(ref) == ["5-gram", "LSTM", "Transformer-XL", "GPT-2"]
    assert ref["5-gram"] == pytest.approx({"longer_bad": 50.0, "longer_good": 60.0, "mixed_island": 70.0,
                                           "mixed_binding": 80.0})
    # restricted to the paradigms scored: a reference that lacks one is left out
    assert blimp.reference(str(blimp_dir), {**paradigms, "other": paradigms["mixed_island"]}) == {}


def test_max_pairs_is_a_fixed_sample(blimp_dir, tmp_path):
    full = blimp.load(str(blimp_dir))
    a, b = blimp.load(str(blimp_dir), 4), blimp.load(str(blimp_dir), 4)
    assert a == b and all(len(p) == 4 for p in a.values())
    assert all(set(a[n]) <= set(full[n]) for n in full)
    assert [p.pair_id for p in a["mixed_island"]] != ["0", "1", "2", "3"]  # a sample, not the head
    # the same pairs whichever other paradigms sit beside it
    (tmp_path / "alone").mkdir()
    (tmp_path / "alone" / "mixed_island.jsonl").write_text((blimp_dir / "mixed_island.jsonl").read_text())
    assert blimp.load(str(tmp_path / "alone"), 4) == {"mixed_island": a["mixed_island"]}
    assert blimp.fingerprint(a) == blimp.fingerprint(b) != blimp.fingerprint(blimp.load(str(blimp_dir), 5))
    assert blimp.load(str(blimp_dir), 50) == full


def test_evaluate_writes_the_tables_and_keeps_scores(runs, blimp_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["evaluate", "--runs", str(runs["gpt2"]), str(runs["bert"]), "--tasks", "blimp", "--blimp-dir",
            str(blimp_dir), "--max-pairs", "6", "--threads", "1", "--out", str(out)]
    assert main(args) == 0
    assert "wrote" in capsys.readouterr().out
    saved = {arch: json.loads((out / arch / "blimp" / "result.json").read_text()) for arch in runs}
    lines = (out / "results.md").read_text().splitlines()
    assert lines[0] == "| method | blimp (accuracy) |"
    assert lines[2] == f"| gpt2 | {saved['gpt2']['test']['accuracy']:.1f} |"
    assert lines[3] == f"| bert | {saved['bert']['test']['accuracy']:.1f} |"
    assert "4 paradigms x 6 pairs (24)" in (out / "results.md").read_text()
    assert "5-gram 65.0" in (out / "results.md").read_text()  # the reference's mean over the same paradigms
    md = (out / "blimp.md").read_text()
    assert "| method | overall | morphology | syntax | syntax_semantics |" in md
    assert "| 5-gram (BLiMP authors) | 65.0 | 55.0 | 70.0 | 80.0 |" in md
    assert "| longer_bad | morphology | agreement | 6 | 100.0 |" in md
    with open(out / "blimp.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == (2 + 4) * (1 + 3 + 3 + 4)  # (runs + reference models) x (overall, fields, terms, paradigms)
    overall = {r["method"]: float(r["accuracy"]) for r in rows if r["level"] == "overall"}
    assert overall["gpt2"] == pytest.approx(saved["gpt2"]["test"]["accuracy"], abs=1e-4)
    assert {r["pairs"] for r in rows if r["level"] == "field" and r["method"] == "bert"} == {"12", "6"}
    # finished scores are kept; other pairs are rescored
    stamp = (out / "gpt2" / "blimp" / "result.json").stat().st_mtime_ns
    assert main(args) == 0
    assert (out / "gpt2" / "blimp" / "result.json").stat().st_mtime_ns == stamp
    assert main([*args[:-4], "--max-pairs", "5", "--out", str(out)]) == 0
    assert (out / "gpt2" / "blimp" / "result.json").stat().st_mtime_ns != stamp
    assert json.loads((out / "gpt2" / "blimp" / "result.json").read_text())["pairs"] == 20


def test_another_run_with_the_same_label_is_scored_not_given_the_kept_result(runs, blimp_dir, tmp_path, capsys):
    """A run whose method (here: directory name) matches a result kept in --out from another run gets its own label
    and is scored; the kept result is left as it was; a third such run is refused with one line; a run whose results
    are kept needs its model no more."""
    out = tmp_path / "eval"
    twins = []
    for where in ("first", "second", "third"):
        shutil.copytree(runs["gpt2"], tmp_path / where / "gpt2")
        twins.append(tmp_path / where / "gpt2")
    common = ["--tasks", "blimp", "--blimp-dir", str(blimp_dir), "--max-pairs", "3", "--threads", "1", "--out",
              str(out)]
    assert main(["evaluate", "--runs", str(twins[0]), *common]) == 0
    kept = (out / "gpt2" / "blimp" / "result.json").read_text()
    assert main(["evaluate", "--runs", str(twins[1]), *common]) == 0
    assert (out / "gpt2" / "blimp" / "result.json").read_text() == kept
    second = json.loads((out / "gpt2_gpt2" / "blimp" / "result.json").read_text())
    assert second["run"] == str(twins[1])
    assert "| gpt2 (gpt2) |" in (out / "results.md").read_text()
    capsys.readouterr()
    assert main(["evaluate", "--runs", str(twins[2]), *common]) == 2
    err = capsys.readouterr().err
    assert "is taken by another run" in err and len(err.strip().splitlines()) == 1, err
    # the same runs again keep their own results, under their own labels, even once their models are deleted
    shutil.rmtree(twins[0] / "model")
    assert main(["evaluate", "--runs", str(twins[1]), str(twins[0]), *common]) == 0
    assert json.loads((out / "gpt2_gpt2" / "blimp" / "result.json").read_text()) == second
    assert (out / "gpt2" / "blimp" / "result.json").read_text() == kept
    assert "| gpt2 (gpt2) |" in (out / "results.md").read_text() and "| gpt2 |" in (out / "results.md").read_text()
    capsys.readouterr()
    assert main(["evaluate", "--runs", str(twins[0]), *common[:-1], str(tmp_path / "elsewhere")]) == 2
    assert "holds no saved model" in capsys.readouterr().err


def test_blimp_column_beside_glue_outside_the_average(tmp_path):
    def result(task, seed, value):
        return {"label": "a", "run": "a", "task": task, "seed": seed, "metric": "accuracy", "splits": f"{task} note",
                "dev": {}, "test": {"accuracy": value}}

    results = [result("sst2", 0, 60.0), result("sst2", 1, 70.0), result("blimp", "", 55.0)]
    table = write_table(results, ["sst2", "blimp"], tmp_path)
    assert table.splitlines()[0] == "| method | sst2 (accuracy) | blimp (accuracy) | average |"
    assert table.splitlines()[2] == "| a | 65.0 ± 7.1 | 55.0 | 65.0 |"
    text = (tmp_path / "results.md").read_text()
    assert "over seeds 0, 1;" in text and "- blimp: blimp note" in text
    assert len((tmp_path / "results.csv").read_text().splitlines()) == 1 + 2 + 1  # two sst2 test rows, one blimp


@pytest.mark.parametrize("args, message", [
    (["--blimp-dir", "{tmp}/nope"], "is not a directory"),
    (["--blimp-dir", "{tmp}/empty"], "holds no BLiMP paradigm files"),
    (["--blimp-dir", "{tmp}/badjson"], "x.jsonl:2: not JSON"),
    (["--blimp-dir", "{tmp}/nofield"], "no 'sentence_bad' field"),
    ([], "--tasks blimp needs --blimp-dir"),
    (["--blimp-dir", "{blimp}", "--max-pairs", "-1"], "--max-pairs must be >= 0"),
    (["--blimp-dir", "hub"], "cannot load BLiMP from the hub"),
    (["--blimp-dir", "{blimp}", "--tasks", "sst2"], "apply only with blimp in --tasks"),
])
def test_bad_blimp_input_is_one_line_exit_2(runs, blimp_dir, tmp_path, capsys, monkeypatch, args, message):
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # never download, even where there is internet
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "empty").mkdir()
    (tmp_path / "badjson").mkdir()
    good = json.dumps(_rows("x", "syntax", "t", 1, 0)[0])
    (tmp_path / "badjson" / "x.jsonl").write_text(good + "\n{oops\n")
    (tmp_path / "nofield").mkdir()
    (tmp_path / "nofield" / "x.jsonl").write_text(json.dumps({"sentence_good": "a", "field": "f",
                                                              "linguistics_term": "t"}) + "\n")
    subs = {"{tmp}": str(tmp_path), "{blimp}": str(blimp_dir)}
    args = [next((a.replace(k, v) for k, v in subs.items() if k in a), a) for a in args]
    tasks = [] if "--tasks" in args else ["--tasks", "blimp"]
    assert main(["evaluate", "--runs", str(runs["gpt2"]), *tasks, *args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
