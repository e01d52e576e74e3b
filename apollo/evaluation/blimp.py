"""Zero-shot BLiMP (Warstadt et al., TACL 2020): 67 paradigms of grammatical / ungrammatical minimal pairs.

A model gets a pair right when it scores ``sentence_good`` strictly above ``sentence_bad`` (a tie counts wrong).
Scores come from minicons (Misra 2022), on batches this module tokenizes itself (sorted by length, so little
padding):

- causal LMs, ``scorer.IncrementalLMScorer``: the sum of the token log-probabilities of the whole sentence (BLiMP's
  "simple LM method"). The sentence is prefixed with the tokenizer's BOS token, else its EOS token (apollo's GPT-2
  and LLaMA tokenizers have bos = eos = <|endoftext|>, the separator the run was trained with), so the first word is
  scored too; the prefix itself is not. A tokenizer with neither leaves the first token unscored.
- masked LMs, ``scorer.MaskedLMScorer`` with PLL "original": the pseudo-log-likelihood of Salazar et al. (2020),
  each token of ``[CLS] sentence [SEP]`` masked in turn (one row per token, all rows of a batch in one forward
  pass) and the log-probabilities of the true tokens summed; the special tokens are not scored.

Accuracies are x100. A field's, a linguistics term's and the overall accuracy are means over their paradigms
(BLiMP's convention; the same as over pairs when every paradigm has as many pairs). BLiMP spells one paradigm's
field ``syntax/semantics`` and the others' ``syntax_semantics``: both count as ``syntax_semantics``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer, BatchEncoding
from transformers.utils import logging as hf_logging

from ..config import ApolloError
from ..models import is_masked, max_tokens
from .finetune import _quiet, model_dir, result_dir

HUB = "hub"  # --blimp-dir hub: the `datasets` copy (needs internet)
HUB_ID = "nyu-mll/blimp"
REFERENCE_FILE = "models_summary.reference.jsonl"
REFERENCE_MODELS = {"ngram": "5-gram", "lstm": "LSTM", "txl": "Transformer-XL", "gpt2": "GPT-2"}
SCORING = "minicons; causal: sum of token log-probs after a BOS/EOS prefix; masked: PLL (original)"
BATCH_TOKENS = 4096  # rows x width per forward pass: on one CPU thread 400 rows of 12 ran 20% faster than 1,300
LOGITS_BUDGET = 2**26  # ... and at most this many logits (256 MiB of fp32), for large vocabularies


@dataclass(frozen=True)
class Pair:
    paradigm: str
    field: str
    term: str
    pair_id: str
    good: str
    bad: str


# ---- data ---------------------------------------------------------------------------------------------------------


def _pair(row: dict, paradigm: str, where: str, index: int) -> Pair:
    if not isinstance(row, dict):
        raise ApolloError(f"{where}: not a JSON object")
    missing = [k for k in ("sentence_good", "sentence_bad", "field", "linguistics_term") if k not in row]
    if missing:
        raise ApolloError(f"{where}: no {missing[0]!r} field (not a BLiMP paradigm file)")
    good, bad = row["sentence_good"], row["sentence_bad"]
    if not (isinstance(good, str) and isinstance(bad, str) and good.strip() and bad.strip()):
        raise ApolloError(f"{where}: sentence_good and sentence_bad must be non-empty strings")
    pair_id = row.get("pairID", row.get("pair_id", index))
    return Pair(paradigm, str(row["field"]).replace("/", "_"), str(row["linguistics_term"]), str(pair_id), good, bad)


def _read_dir(d: Path) -> dict[str, list[Pair]]:
    if not d.is_dir():
        raise ApolloError(f"--blimp-dir {d} is not a directory (pass BLiMP's folder of paradigm .jsonl files, "
                          f"or --blimp-dir {HUB})")
    files = sorted(p for p in d.glob("*.jsonl") if p.name != REFERENCE_FILE)
    if not files:
        raise ApolloError(f"--blimp-dir {d} holds no BLiMP paradigm files (NAME.jsonl)")
    paradigms = {}
    for path in files:
        pairs = []
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise ApolloError(f"{path} is not UTF-8") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ApolloError(f"{path}:{n}: not JSON ({e.msg})") from None
            pairs.append(_pair(row, path.stem, f"{path}:{n}", len(pairs)))
        if not pairs:
            raise ApolloError(f"{path} holds no pairs")
        paradigms[path.stem] = pairs
    return paradigms


def _read_hub() -> dict[str, list[Pair]]:
    """Every BLiMP config of the hub's dataset (its one split, ``train``)."""
    from datasets import get_dataset_config_names, load_dataset

    try:
        paradigms = {}
        for name in sorted(get_dataset_config_names(HUB_ID)):
            rows = load_dataset(HUB_ID, name, split="train")
            paradigms[name] = [_pair(r, name, f"{HUB_ID}/{name} row {i}", i) for i, r in enumerate(rows)]
    except ApolloError:
        raise
    except Exception as e:  # offline, renamed, ...: one line, not a traceback
        raise ApolloError(f"cannot load BLiMP from the hub ({HUB_ID}) with datasets ({e.__class__.__name__}); "
                          f"pass --blimp-dir with BLiMP's paradigm .jsonl files") from None
    if not paradigms:
        raise ApolloError(f"the hub's {HUB_ID} has no paradigms")
    return paradigms


def load(source: str, max_pairs: int = 0) -> dict[str, list[Pair]]:
    """Paradigm name -> pairs, from a folder of BLiMP ``NAME.jsonl`` files or ``"hub"``; with ``max_pairs`` a fixed
    sample of that many pairs per paradigm, seeded by the paradigm's name (the same pairs for every run and call)."""
    if not source:
        raise ApolloError(f"--tasks blimp needs --blimp-dir: BLiMP's folder of paradigm .jsonl files "
                          f"(github.com/alexwarstadt/blimp, data/), or --blimp-dir {HUB} to download it")
    if max_pairs < 0:
        raise ApolloError(f"--max-pairs must be >= 0 (0 = all pairs), got {max_pairs}")
    paradigms = _read_hub() if source == HUB else _read_dir(Path(source))
    return {name: subsample(pairs, max_pairs) for name, pairs in paradigms.items()}


def subsample(pairs: list[Pair], max_pairs: int) -> list[Pair]:
    if not max_pairs or len(pairs) <= max_pairs:
        return pairs
    keep = sorted(random.Random(f"blimp:{pairs[0].paradigm}").sample(range(len(pairs)), max_pairs))
    return [pairs[i] for i in keep]


def fingerprint(paradigms: dict[str, list[Pair]]) -> str:
    """sha256 of the pairs scored: a rerun on the same pairs keeps its scores."""
    h = hashlib.sha256()
    for name in sorted(paradigms):
        for p in paradigms[name]:
            h.update(json.dumps([p.paradigm, p.field, p.term, p.pair_id, p.good, p.bad]).encode())
    return h.hexdigest()


def reference(source: str, paradigms: dict[str, list[Pair]]) -> dict[str, dict[str, float]]:
    """The BLiMP authors' per-paradigm accuracies x100 (model label -> paradigm -> accuracy) from
    ``models_summary.reference.jsonl`` beside the paradigm files, for the paradigms scored; {} if absent."""
    path = Path(source) / REFERENCE_FILE
    if source == HUB or not path.is_file():
        return {}
    out: dict[str, dict[str, float]] = {label: {} for label in REFERENCE_MODELS.values()}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if row["UID"] in paradigms:  # skips the file's own "overall" rows: aggregated here over what was scored
                for key, label in REFERENCE_MODELS.items():
                    out[label][row["UID"]] = 100 * float(row[key])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise ApolloError(f"{path}:{n}: not a BLiMP summary row (UID, ngram, lstm, txl, gpt2)") from None
    return {label: acc for label, acc in out.items() if set(acc) == set(paradigms)}


# ---- scoring ------------------------------------------------------------------------------------------------------


def _minicons_scorer():
    level = hf_logging.get_verbosity()
    from minicons import scorer  # sets transformers' verbosity to "error" on import: put it back

    hf_logging.set_verbosity(level)
    return scorer


def load_lm(run: Path):
    """(model, tokenizer, masked) of a run directory or saved HF model directory."""
    path = model_dir(Path(run))
    config = AutoConfig.from_pretrained(path)
    masked = is_masked(config.model_type)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ApolloError(f"cannot load the tokenizer in {path}: {(str(e).splitlines() or [''])[0][:200]}") from None
    try:
        with _quiet():
            model = (AutoModelForMaskedLM if masked else AutoModelForCausalLM).from_pretrained(path).eval()
    except (OSError, ValueError) as e:
        raise ApolloError(f"cannot load {path} as a language model: {(str(e).splitlines() or [''])[0][:200]}") \
            from None
    return model, tok, masked


def _batches(widths: list[int], rows: list[int], budget: int):
    """Index batches of similar length (sorted) whose padded size, rows x width, stays within ``budget`` tokens."""
    batch: list[int] = []
    n_rows = 0
    for i in sorted(range(len(widths)), key=lambda i: widths[i]):
        if batch and (n_rows + rows[i]) * widths[i] > budget:
            yield batch
            batch, n_rows = [], 0
        batch.append(i)
        n_rows += rows[i]
    if batch:
        yield batch


@torch.no_grad()
def sentence_scores(model, tok, masked: bool, sentences: list[str]) -> list[float]:
    """Each sentence's log-probability (causal LM) or pseudo-log-likelihood (masked LM), in nats."""
    scorer = _minicons_scorer()
    unique = list(dict.fromkeys(sentences))  # BLiMP repeats some sentences: score each once
    limit = max_tokens(model.config)
    if masked:
        lm = scorer.MaskedLMScorer(model, "cpu", tokenizer=tok)
        ids = tok(unique)["input_ids"]  # with the tokenizer's own [CLS] ... [SEP] (or <s> ... </s>)
        scored = [len(x) - 2 for x in ids]  # one masked row per scored token
    else:
        if tok.pad_token is None:  # padding is masked out; set here so minicons does not add a token to the model
            tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.convert_ids_to_tokens(0)
        lm = scorer.IncrementalLMScorer(model, "cpu", tokenizer=tok)
        prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        ids = [([] if prefix is None else [prefix]) + x for x in tok(unique, add_special_tokens=False)["input_ids"]]
        scored = [len(x) - 1 for x in ids]  # minicons scores every token after the first
    longest = max(range(len(ids)), key=lambda i: len(ids[i]))
    if len(ids[longest]) > limit:
        raise ApolloError(f"BLiMP sentence {unique[longest]!r} is {len(ids[longest])} tokens, more than the "
                          f"model's {limit} positions")
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    budget = max(limit, min(BATCH_TOKENS, LOGITS_BUDGET // model.config.vocab_size))
    scores = [0.0] * len(unique)
    for batch in _batches([len(x) for x in ids], scored if masked else [1] * len(ids), budget):
        width = max(len(ids[i]) for i in batch)
        enc = BatchEncoding({"input_ids": torch.tensor([ids[i] + [pad] * (width - len(ids[i])) for i in batch]),
                             "attention_mask": torch.tensor([[1] * len(ids[i]) + [0] * (width - len(ids[i]))
                                                             for i in batch])})
        prepared = lm.prepare_text(enc, PLL_metric="original") if masked else lm.prepare_text(enc)
        for i, t in zip(batch, lm.compute_stats(prepared, return_tensors=True), strict=True):
            if len(t) != scored[i]:  # e.g. a special token inside the sentence: not what this module scores
                raise ApolloError(f"BLiMP sentence {unique[i]!r}: minicons scored {len(t)} tokens, expected "
                                  f"{scored[i]}")
            scores[i] = float(t.double().sum())
    by_sentence = dict(zip(unique, scores, strict=True))
    return [by_sentence[s] for s in sentences]


# ---- one run, aggregation, tables ---------------------------------------------------------------------------------


def aggregate(paradigms: dict[str, list[Pair]], accuracy: dict[str, float]) -> dict:
    """Per paradigm accuracies -> {"overall", "field": {...}, "term": {...}, "paradigm": {...}}: means over
    paradigms."""
    groups: dict[str, dict[str, list[float]]] = {"field": {}, "term": {}}
    for name, pairs in paradigms.items():
        groups["field"].setdefault(pairs[0].field, []).append(accuracy[name])
        groups["term"].setdefault(pairs[0].term, []).append(accuracy[name])
    return {"overall": float(np.mean([accuracy[n] for n in paradigms])),
            **{level: {k: float(np.mean(v)) for k, v in sorted(g.items())} for level, g in groups.items()},
            "paradigm": {n: accuracy[n] for n in sorted(paradigms)}}


def note(paradigms: dict[str, list[Pair]], ref: dict[str, dict[str, float]], breakdown: bool = True) -> str:
    counts = sorted({len(p) for p in paradigms.values()})
    each = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    text = (f"zero-shot, {len(paradigms)} paradigms x {each} pairs ({sum(map(len, paradigms.values()))}); accuracy "
            f"x100, mean over paradigms; {SCORING}" + ("; breakdown in blimp.md" if breakdown else ""))
    if ref:
        text += "; the BLiMP authors' models on the same paradigms (all pairs): " + ", ".join(
            f"{label} {aggregate(paradigms, acc)['overall']:.1f}" for label, acc in ref.items())
    return text


def score_run(run: Path, paradigms: dict[str, list[Pair]], out: Path | None = None, threads: int = 0,
              log=print) -> dict:
    """Score every pair with the run's model; returns (and writes to ``out/result.json``, with every pair's
    scores in ``out/pairs.csv``) the accuracies."""
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    model, tok, masked = load_lm(run)
    pairs = [p for name in sorted(paradigms) for p in paradigms[name]]
    log(f"BLiMP: scoring {len(pairs)} pairs with {'PLL' if masked else 'the summed log-probs'} of {run}")
    scores = sentence_scores(model, tok, masked, [s for p in pairs for s in (p.good, p.bad)])
    good, bad = scores[0::2], scores[1::2]
    right: dict[str, list[bool]] = {}
    for p, g, b in zip(pairs, good, bad, strict=True):
        right.setdefault(p.paradigm, []).append(g > b)
    accuracy = aggregate(paradigms, {name: 100 * float(np.mean(v)) for name, v in right.items()})
    result = {"run": str(run), "task": "blimp", "seed": "", "metric": "accuracy", "dev": {},
              "test": {"accuracy": accuracy["overall"]}, "accuracy": accuracy, "model": "masked" if masked else
              "causal", "pairs": len(pairs), "wall_s": time.perf_counter() - start,
              "config": settings(paradigms)}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "pairs.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["paradigm", "pairID", "score_good", "score_bad", "correct"])
            writer.writerows([p.paradigm, p.pair_id, f"{g:.6f}", f"{b:.6f}", int(g > b)]
                             for p, g, b in zip(pairs, good, bad, strict=True))
        (out / "result.json").write_text(json.dumps(result, indent=1))
    return result


def settings(paradigms: dict[str, list[Pair]]) -> dict:
    """What a kept result must match to be reused: the pairs (all of their text) and the scoring."""
    return {"pairs": sum(map(len, paradigms.values())), "pairs_sha256": fingerprint(paradigms), "scoring": SCORING}


def evaluate(labels: dict[Path, str], paradigms: dict[str, list[Pair]], out: Path,
             ref: dict[str, dict[str, float]] | None = None, threads: int = 0, log=print) -> list[dict]:
    """Score every run (``labels``: run -> label) into ``out/LABEL/blimp``; a result there on the same pairs is
    kept, not rescored."""
    results = []
    for run, label in labels.items():
        where = result_dir(out, label) / "blimp"
        saved = json.loads((where / "result.json").read_text()) if (where / "result.json").is_file() else {}
        if saved.get("config") != settings(paradigms):
            saved = score_run(run, paradigms, where, threads, log)
        results.append(saved | {"label": label, "splits": note(paradigms, ref or {})})
    return results


def write_tables(results: list[dict], paradigms: dict[str, list[Pair]], ref: dict[str, dict[str, float]],
                 out: Path) -> None:
    """``blimp.md`` (overall and per field, per linguistics term, per paradigm: the runs, then the reference
    models as context) and ``blimp.csv`` (every level: method, run, level, name, pairs, accuracy)."""
    rows = [(r["label"], r["run"], r["accuracy"]) for r in results]
    rows += [(f"{label} (BLiMP authors)", "reference", aggregate(paradigms, acc)) for label, acc in ref.items()]
    pairs = {"overall": {"overall": sum(map(len, paradigms.values()))}, "field": {}, "term": {},
             "paradigm": {name: len(p) for name, p in paradigms.items()}}
    for p in paradigms.values():
        pairs["field"][p[0].field] = pairs["field"].get(p[0].field, 0) + len(p)
        pairs["term"][p[0].term] = pairs["term"].get(p[0].term, 0) + len(p)
    fields, terms = sorted(pairs["field"]), sorted(pairs["term"])
    md = ["# BLiMP (zero-shot)", "", note(paradigms, ref, breakdown=False) + ". Reference models: the BLiMP authors' "
          "per-paradigm figures, grouped here by the data's own field and term.", "",
          "| method | overall | " + " | ".join(fields) + " |", "|---" * (len(fields) + 2) + "|"]
    md += [f"| {label} | {a['overall']:.1f} | " + " | ".join(f"{a['field'][f]:.1f}" for f in fields) + " |"
           for label, _, a in rows]
    md += ["", "Per linguistics term:", "", "| method | " + " | ".join(terms) + " |", "|---" * (len(terms) + 1) + "|"]
    md += [f"| {label} | " + " | ".join(f"{a['term'][t]:.1f}" for t in terms) + " |" for label, _, a in rows]
    md += ["", "Per paradigm:", "", "| paradigm | field | term | pairs | " + " | ".join(r[0] for r in rows) + " |",
           "|---" * (len(rows) + 4) + "|"]
    for name in sorted(paradigms):
        p = paradigms[name]
        md.append(f"| {name} | {p[0].field} | {p[0].term} | {len(p)} | "
                  + " | ".join(f"{a['paradigm'][name]:.1f}" for _, _, a in rows) + " |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "blimp.md").write_text("\n".join(md) + "\n")
    with open(out / "blimp.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "run", "level", "name", "pairs", "accuracy"])
        for label, run, a in rows:
            levels = {"overall": {"overall": a["overall"]}, "field": a["field"], "term": a["term"],
                      "paradigm": a["paradigm"]}
            writer.writerows([label, run, level, name, "" if run == "reference" else pairs[level][name],
                              round(value, 4)] for level, values in levels.items() for name, value in values.items())
