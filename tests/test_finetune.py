"""Downstream evaluation: GLUE TSV variants, metrics, SQuAD processing, a tiny fine-tune, the table, and errors."""

import dataclasses
import json
import random

import numpy as np
import pytest
import torch
from conftest import tiny_model_config

from apollo.cli import main
from apollo.config import ApolloError
from apollo.data import train_tokenizer
from apollo.evaluation.finetune import FinetuneConfig, _encode_glue, evaluate_runs, finetune, task_splits
from apollo.evaluation.glue import GLUE_TASKS, Example, glue_metrics, hub_to_splits, read_tsv, tsv_splits
from apollo.evaluation.squad import eval_features, postprocess, read_squad_json, squad_metrics, train_features
from apollo.models import build_model

FILLER = "the a cat dog house river walked saw near under big small old red blue tree ran slowly".split()
POS, NEG = ("great", "lovely", "superb"), ("awful", "boring", "dreadful")


def _sentence(rng: random.Random, word: str) -> str:
    words = rng.choices(FILLER, k=rng.randint(3, 7))
    words.insert(rng.randint(0, len(words)), word)
    return " ".join(words)


def _sentiment(n: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        rows.append((_sentence(rng, rng.choice(POS if label else NEG)), label))
    return rows


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory):
    """An SST-2-format task folder (header sentence<TAB>label; unlabelled test) from a keyword-sentiment rule."""
    d = tmp_path_factory.mktemp("glue") / "SST-2"
    d.mkdir()
    for name, n, seed in (("train", 480, 0), ("dev", 120, 1)):
        (d / f"{name}.tsv").write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in _sentiment(n, seed)))
    (d / "test.tsv").write_text("index\tsentence\n0\tsome text\n")
    return d.parent


def _save_model(path, arch: str, texts: list[str]):
    cfg = tiny_model_config(arch, layers=2)
    cfg = type(cfg)(**{**cfg.__dict__, "seq_len": 64})
    tok = train_tokenizer(texts, arch, cfg.vocab)
    model = build_model(cfg, 2, seed=0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    texts = [s for s, _ in _sentiment(600, 5)] + ["What is the capital of France ? Paris is the capital ."] * 5
    root = tmp_path_factory.mktemp("models")
    return {arch: _save_model(root / arch / "model", arch, texts).parent for arch in ("bert", "gpt2")}


# ---- TSV variants -------------------------------------------------------------------------------------------------


def test_tsv_header_no_header_and_bom(tmp_path):
    sst = tmp_path / "sst.tsv"
    sst.write_text("sentence\tlabel\ngood film \t1\nbad film \t0\n")
    assert read_tsv(sst, GLUE_TASKS["sst2"]) == [Example("good film ", None, 1), Example("bad film ", None, 0)]
    mrpc = tmp_path / "mrpc.tsv"  # GLUE's MRPC train: no header
    mrpc.write_text("1\t11\t12\tA cat sat.\tThe cat sat.\n0\t13\t14\tRain.\tSun.\n")
    assert read_tsv(mrpc, GLUE_TASKS["mrpc"]) == [Example("A cat sat.", "The cat sat.", 1), Example("Rain.", "Sun.", 0)]
    bom = tmp_path / "bom.tsv"  # MRPC's test file: header behind a UTF-8 BOM
    bom.write_bytes("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n0\t1\t2\tx y\tz\n".encode())
    assert read_tsv(bom, GLUE_TASKS["mrpc"]) == [Example("x y", "z", 0)]
    sts = tmp_path / "sts.tsv"  # STS-B without header: the score is the last of 10 columns
    sts.write_text("0\tg\tf\ty\t1\tn\tn\tA man.\tA person.\t3.800\n")
    assert read_tsv(sts, GLUE_TASKS["stsb"]) == [Example("A man.", "A person.", 3.8)]
    rte = tmp_path / "rte.tsv"
    rte.write_text("index\tsentence1\tsentence2\tlabel\n0\tp\th\tnot_entailment\n1\tp\th\tentailment\n")
    assert [e.label for e in read_tsv(rte, GLUE_TASKS["rte"])] == [1, 0]
    unlabelled = tmp_path / "test.tsv"
    unlabelled.write_text("index\tsentence\n0\tsome text\n")
    assert read_tsv(unlabelled, GLUE_TASKS["sst2"]) == [Example("some text", None, None)]


@pytest.mark.parametrize("content, message", [
    (b"sentence\tlabel\ngood\tyes\n", "label 'yes' is not one of 0, 1"),
    (b"\xff\xfe\x00bad", "not UTF-8"),
    (b"", "is empty"),
    (b"sentence\tlabel\n", "no examples"),
])
def test_tsv_errors(tmp_path, content, message):
    path = tmp_path / "x.tsv"
    path.write_bytes(content)
    with pytest.raises(ApolloError, match=message):
        read_tsv(path, GLUE_TASKS["sst2"])


def test_splits_missing_and_hidden_test(glue_dir, tmp_path):
    splits = tsv_splits(GLUE_TASKS["sst2"], glue_dir)
    assert set(splits) == {"train", "dev"}  # the unlabelled test file is not a split
    with pytest.raises(ApolloError, match="missing dev split"):
        (tmp_path / "RTE").mkdir()
        (tmp_path / "RTE" / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n")
        tsv_splits(GLUE_TASKS["rte"], tmp_path)
    # hidden test labels: official dev becomes test, dev is a fixed slice of train, disjoint from it
    s, note = task_splits(FinetuneConfig("sst2", data_dir=str(glue_dir), dev_size=100))
    assert len(s["dev"]) == 96 and len(s["train"]) == 384 and len(s["test"]) == 120 and "test = the dev split" in note
    s2, _ = task_splits(FinetuneConfig("sst2", data_dir=str(glue_dir), dev_size=100, seed=7, max_train=50))
    assert s2["dev"] == s["dev"] and len(s2["train"]) == 50
    s3, note = task_splits(FinetuneConfig("sst2", data_dir=str(glue_dir), dev_size=100, max_dev=30))
    assert len(s3["dev"]) == 30 and set(s3["dev"]) <= set(s["dev"]) and s3["test"] == s["test"] and "of 30" in note


def test_hub_rows_convert():
    ds = {"train": {"sentence1": ["a", "b"], "sentence2": ["c", "d"], "label": [0, 1]},
          "dev": {"sentence1": ["e"], "sentence2": ["f"], "label": [1]},
          "test": {"sentence1": ["g"], "sentence2": ["h"], "label": [-1]}}
    out = hub_to_splits(GLUE_TASKS["rte"], ds)
    assert set(out) == {"train", "dev"} and out["train"][1] == Example("b", "d", 1)
    sts = hub_to_splits(GLUE_TASKS["stsb"], {k: v | {"label": [2.5] * len(v["label"])} for k, v in ds.items()})
    assert sts["test"][0].label == 2.5


# ---- metrics ------------------------------------------------------------------------------------------------------


def test_metrics_known_values():
    y, p = np.array([1, 1, 1, 0, 0, 0]), np.array([1, 1, 0, 0, 0, 1])
    m = glue_metrics(GLUE_TASKS["mrpc"], p, y)  # TP 2, FP 1, FN 1: F1 = 2/3, accuracy 4/6
    assert m["f1"] == pytest.approx(200 / 3) and m["accuracy"] == pytest.approx(400 / 6)
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (4 - 1) / 9
    assert glue_metrics(GLUE_TASKS["cola"], p, y)["mcc"] == pytest.approx(100 / 3)
    s = glue_metrics(GLUE_TASKS["stsb"], np.array([1.0, 2.0, 3.0, 10.0]), np.array([0.0, 1.0, 2.0, 3.0]))
    # centred x = (-3, -2, -1, 6), y = (-1.5, -.5, .5, 1.5): r = 14 / sqrt(50 * 5); the ranks agree exactly
    assert s["spearman"] == pytest.approx(100.0) and s["pearson"] == pytest.approx(100 * 14 / 250**0.5)
    assert glue_metrics(GLUE_TASKS["stsb"], np.ones(4), np.arange(4.0))["pearson"] == 0.0  # constant prediction
    nearly = np.float32(0.3) + np.array([0, 1e-9, 0, 0], dtype=np.float32)  # float noise only: NaN in SciPy
    assert glue_metrics(GLUE_TASKS["stsb"], nearly, np.arange(4.0)) == {"spearman": 0.0, "pearson": 0.0}


def test_squad_metrics_official_normalisation():
    rows = [{"id": "1", "answers": {"text": ["the Eiffel Tower", "Eiffel"]}},
            {"id": "2", "answers": {"text": ["blue whale"]}},
            {"id": "3", "answers": {"text": []}}]  # SQuAD 2.0 no-answer
    m = squad_metrics(rows, {"1": "Eiffel tower!", "2": "the whale", "3": ""})
    # 1: exact after normalisation; 2: F1 2*(1/1*1/2)/(1+1/2) = 2/3; 3: empty matches no-answer
    assert m["exact_match"] == pytest.approx(200 / 3) and m["f1"] == pytest.approx(100 * (1 + 2 / 3 + 1) / 3)
    assert squad_metrics(rows[2:], {"3": "something"})["f1"] == 0.0


# ---- SQuAD processing --------------------------------------------------------------------------------------------

CONTEXT = "Paris is the capital of France . Berlin is the capital of Germany ."


@pytest.fixture
def squad_file(tmp_path):
    qas = [{"id": "q1", "question": "What is the capital of France ?",
            "answers": [{"text": "Paris", "answer_start": 0}]},
           {"id": "q2", "question": "What is the capital of Germany ?",
            "answers": [{"text": "Berlin", "answer_start": CONTEXT.index("Berlin")}]}]
    path = tmp_path / "train-v1.1.json"
    path.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [{"context": CONTEXT, "qas": qas}]}]}))
    return path


def test_squad_features_and_postprocess(squad_file, models, arch):
    from transformers import AutoTokenizer

    rows = read_squad_json(squad_file)
    assert rows[1]["answers"] == {"text": ["Berlin"], "answer_start": [CONTEXT.index("Berlin")]}
    tok = AutoTokenizer.from_pretrained(models[arch] / "model")
    # a short window with a stride: "Berlin" falls outside the first window of q2 and inside a later one
    feats = train_features(rows, tok, max_length=24, stride=8)
    inputs, meta = eval_features(rows, tok, max_length=24, stride=8)
    assert len(feats) == len(inputs) > len(rows)
    for f, m in zip(feats, meta, strict=True):
        s, e = f["start_positions"], f["end_positions"]
        gold = rows[m["example"]]["answers"]["text"][0]
        if s == 0:  # the null span: the answer is not in this window
            assert all(o is None or CONTEXT[o[0]:o[1]] not in (gold, " " + gold) for o in m["offsets"])
        else:
            assert CONTEXT[m["offsets"][s][0]:m["offsets"][e][1]].strip() == gold
    # logits that point at the gold span of each feature (else at the null span) recover both answers
    starts, ends = [], []
    for f in feats:
        n = len(f["input_ids"])
        s, e = np.full(n, -5.0), np.full(n, -5.0)
        s[f["start_positions"]] += 10
        e[f["end_positions"]] += 10
        starts.append(s)
        ends.append(e)
    answers = postprocess(rows, meta, starts, ends)
    assert {k: v.strip() for k, v in answers.items()} == {"q1": "Paris", "q2": "Berlin"}
    assert squad_metrics(rows, answers)["exact_match"] == 100.0
    # SQuAD 2.0: a null span scoring above every answer span means "no answer"
    null = [s.copy() for s in starts]
    for s in null:
        s[0] = 100.0
    assert set(postprocess(rows, meta, null, ends, allow_null=True).values()) == {""}


# ---- fine-tuning --------------------------------------------------------------------------------------------------


def test_gpt_pairs_are_separated_by_eos(models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models["gpt2"] / "model")
    (f,) = _encode_glue(tok, [Example("a cat", "a dog", 1)], 64)
    assert tok.eos_token_id in f["input_ids"][1:-1] and f["labels"] == 1


def test_tiny_finetune_learns_far_above_chance(models, glue_dir, arch, tmp_path):
    cfg = FinetuneConfig("sst2", data_dir=str(glue_dir), epochs=6, batch_size=16, lr=3e-3, dev_size=100, patience=0,
                         dropout=0.0)
    r = finetune(models[arch], cfg, tmp_path / "ft", log=lambda _: None)
    assert r["test"]["accuracy"] > 85.0, r["history"]
    assert json.loads((tmp_path / "ft" / "result.json").read_text())["test"] == r["test"]
    assert r["splits"].startswith("test = the dev split")
    # reproducible from the seed
    again = finetune(models[arch], cfg, None, log=lambda _: None)
    assert again["test"] == r["test"] and again["history"] == r["history"]


def test_early_stopping_keeps_the_best_dev_epoch(models, glue_dir, tmp_path):
    cfg = FinetuneConfig("sst2", data_dir=str(glue_dir), epochs=4, batch_size=16, lr=3e-3, dev_size=100, patience=1,
                         dropout=0.0)
    r = finetune(models["bert"], cfg, None, log=lambda _: None)
    dev = [h["dev_accuracy"] for h in r["history"]]
    assert r["dev"]["accuracy"] == max(dev) and r["best_epoch"] == dev.index(max(dev)) + 1
    for i in range(1, len(dev) - 1):  # stopped at the first epoch that did not improve on the best so far
        assert dev[i] > max(dev[:i])


def test_evaluate_table(models, glue_dir, tmp_path):
    from apollo.config import RunConfig, from_dict, save_yaml

    save_yaml(from_dict({"method": {"method": "scratch"}}, RunConfig()), models["bert"] / "config.yaml")
    cfg = FinetuneConfig("", data_dir=str(glue_dir), epochs=1, batch_size=32, lr=3e-3, dev_size=100)
    out = tmp_path / "eval"
    table = evaluate_runs([models["bert"], models["gpt2"]], ["sst2"], [0, 1], cfg, out, log=lambda _: None)
    lines = table.splitlines()
    assert lines[0] == "| method | sst2 (accuracy) | average |"
    assert lines[2].startswith("| scratch | ") and " ± " in lines[2] and lines[3].startswith("| gpt2 | ")
    assert len((out / "results.csv").read_text().splitlines()) == 1 + 2 * 2 * 2  # 2 runs x 2 seeds x dev/test
    # finished fine-tunes are kept: a second call trains nothing
    stamp = (out / "scratch" / "sst2-s0" / "result.json").stat().st_mtime_ns
    assert evaluate_runs([models["bert"], models["gpt2"]], ["sst2"], [0, 1], cfg, out, log=lambda _: None) == table
    assert (out / "scratch" / "sst2-s0" / "result.json").stat().st_mtime_ns == stamp
    # ... also with another thread count, but one run with other settings is redone
    evaluate_runs([models["bert"]], ["sst2"], [0], dataclasses.replace(cfg, threads=1), out, log=lambda _: None)
    assert (out / "scratch" / "sst2-s0" / "result.json").stat().st_mtime_ns == stamp
    other = FinetuneConfig("", data_dir=str(glue_dir), epochs=1, batch_size=32, lr=1e-3, dev_size=100)
    evaluate_runs([models["bert"]], ["sst2"], [0], other, out, log=lambda _: None)
    assert (out / "scratch" / "sst2-s0" / "result.json").stat().st_mtime_ns != stamp
    assert json.loads((out / "scratch" / "sst2-s0" / "result.json").read_text())["config"]["lr"] == 1e-3


@pytest.mark.parametrize("args, message", [
    (["finetune", "--model", "{model}", "--task", "sst3", "--data-dir", "{glue}"], "unknown task 'sst3'"),
    (["finetune", "--model", "{model}", "--task", "rte", "--data-dir", "{glue}"], "rte: missing train split"),
    (["finetune", "--model", "{empty}", "--task", "sst2", "--data-dir", "{glue}"], "holds no saved model"),
    (["finetune", "--model", "{model}", "--task", "squad", "--data-dir", "{glue}"], "squad: missing train split"),
    (["finetune", "--model", "{noweights}", "--task", "sst2", "--data-dir", "{glue}"], "cannot load"),
    (["finetune", "--model", "{model}", "--task", "sst2", "--data-dir", "{empty}/nope"], "is not a directory"),
    (["evaluate", "--runs", "{model}", "--tasks", "sst2,cola9", "--data-dir", "{glue}"], "unknown task 'cola9'"),
    (["evaluate", "--runs", "{model}", "--seeds", "0,x", "--data-dir", "{glue}"], "--seeds must be"),
])
def test_bad_input_is_one_line_exit_2(models, glue_dir, tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "noweights").mkdir()  # a config but no weights
    (tmp_path / "noweights" / "config.json").write_text((models["bert"] / "model" / "config.json").read_text())
    subs = {"{model}": str(models["bert"]), "{glue}": str(glue_dir), "{empty}": str(tmp_path / "empty"),
            "{noweights}": str(tmp_path / "noweights")}
    assert main([subs.get(a, a) for a in args] + ["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_squad_finetune_end_to_end(models, arch, tmp_path):
    def qa(i):
        city, country = ("Paris", "France") if i % 2 == 0 else ("Berlin", "Germany")
        return {"id": f"q{i}", "question": f"What is the capital of {country} ?",
                "answers": [{"text": city, "answer_start": CONTEXT.index(city)}]}

    for name, n in (("train-v1.1.json", 10), ("dev-v1.1.json", 2)):
        paragraphs = [{"context": CONTEXT, "qas": [qa(i) for i in range(n)]}]
        (tmp_path / name).write_text(json.dumps({"data": [{"title": "t", "paragraphs": paragraphs}]}))
    cfg = FinetuneConfig("squad", data_dir=str(tmp_path), epochs=2, batch_size=4, lr=1e-3, dev_size=2, doc_stride=16)
    r = finetune(models[arch], cfg, None, log=lambda _: None)
    assert set(r["test"]) == {"f1", "exact_match"} and r["test_examples"] == 2 and r["dev_examples"] == 2
    assert 0.0 <= r["test"]["f1"] <= 100.0


def test_lm_perplexity_matches_the_hf_loss(models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from apollo.data import pack_blocks
    from apollo.evaluation.finetune import lm_perplexity

    text = tmp_path / "test.txt"
    text.write_text("\n".join(s for s, _ in _sentiment(200, 9)) + "\n")
    ppl = lm_perplexity(models["gpt2"], [str(text)])
    model = AutoModelForCausalLM.from_pretrained(models["gpt2"] / "model").eval()
    blocks = pack_blocks(text.read_text().splitlines(), AutoTokenizer.from_pretrained(models["gpt2"] / "model"), 64,
                         "gpt2")
    with torch.no_grad():  # one batch of equal-length blocks: HF's mean loss is the mean token loss
        expected = float(torch.exp(model(input_ids=blocks, labels=blocks).loss))
    assert ppl == pytest.approx(expected, rel=1e-4)
    assert 1 < lm_perplexity(models["bert"], [str(text)]) < 10 * 512  # MLM: finite, below a few x vocab size


def test_table_mean_std_average_and_perplexity(tmp_path):
    from apollo.evaluation.finetune import write_table

    def result(label, task, seed, value):
        metric = "accuracy" if task == "rte" else "spearman"
        return {"label": label, "run": label, "task": task, "seed": seed, "metric": metric, "splits": "s",
                "dev": {metric: 0.0}, "test": {metric: value}}

    results = [result("a", "rte", 0, 50.0), result("a", "rte", 1, 54.0), result("a", "stsb", 0, 10.0),
               result("a", "stsb", 1, 20.0), result("b", "rte", 0, 60.0)]
    table = write_table(results, ["rte", "stsb"], tmp_path, {"a": 123.45, "b": 7.0})
    rows = table.splitlines()
    assert rows[0] == "| method | rte (accuracy) | stsb (spearman) | average | LM perplexity |"
    # mean ± sample std (ddof 1); the average is over the task means; a missing task leaves no average
    assert rows[2] == "| a | 52.0 ± 2.8 | 15.0 ± 7.1 | 33.5 | 123.5 |"
    assert rows[3] == "| b | 60.0 | – | – | 7.0 |"
